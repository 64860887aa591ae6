"""StaticTorchEngine: the torch engine for GPUs: static buffers per pass shape, CUDA-graph replay, bf16 / fp16.

The same graph modules as `TorchEngine` (model.graphs), driven so that every pass can be captured:

    cache        one preallocated [layers, 2, kv_heads, T_max, head_dim] tensor in the weights' dtype, read in place
                 by the backbone (per-layer views); a pass's committed slots are written with one `index_copy_`
                 (the slot indices are views of a preallocated arange): nothing is allocated per pass
    pass shapes  one `_Pass` per token count n: static inputs (embeds, positions, mask) and outputs (logits float32,
                 new_kv) allocated on its first call; a pass copies its inputs in, runs, and reads its outputs
    CUDA graphs  on cuda with `cuda_graphs`, each shape the decoders use (`tensorrt_profiles.token_counts`: 1, B, 2B,
                 L, P, the instruction / observation parts of the prefill, and the prefill or its observation part
                 with the first refine / full-diffusion pass folded in: + B, + L) is captured on its first call (warm-up
                 on a side stream, then `torch.cuda.CUDAGraph` into one shared memory pool) and replayed after; any
                 other n (real-time chunking carries) runs eagerly through the same buffers; a failed capture
                 falls back to eager for that n, with a warning
    dtype        float32 (default), bfloat16 or float16 weights and cache; the attention softmax, the rotary
                 frequencies and the returned logits stay float32

With capture off (always on the CPU) this is the same code path minus the replay, so tests on the CPU check it
against `TorchEngine` and ONNX Runtime; `describe()` reports which shapes were captured and how many passes ran
eagerly.
"""
from __future__ import annotations

import logging

import numpy as np

from .engine import Engine
from .kv_cache import KVCache
from .tables import Tables
from .tensorrt_profiles import token_counts

log = logging.getLogger(__name__)

DTYPES = {'float32': 'float32', 'fp32': 'float32', 'bfloat16': 'bfloat16', 'bf16': 'bfloat16',
          'float16': 'float16', 'fp16': 'float16'}
WARMUP_RUNS = 2  # eager runs on a side stream before a capture (cuBLAS handles, lazy kernel loads)
FLOAT32_BUFFERS = ('inv_freq', 'original_inv_freq')  # rotary frequencies: in bf16, the angle at position 300 is off
# by up to ~1 rad (8-bit mantissa); transformers computes the rotary embedding in float32 from them


def torch_dtype(name: str):
    """'float32' | 'bfloat16' | 'float16' (or fp32 / bf16 / fp16) -> torch dtype; anything else: ValueError."""
    import torch

    key = DTYPES.get(str(name).lower())
    if key is None:
        raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {name!r}')
    return getattr(torch, key)


def cast_policy(policy, device, dtype):
    """`policy.to(device, dtype)` in place, keeping the rotary frequency buffers in float32. -> policy"""
    import torch

    keep = {name: buf for name, buf in policy.named_buffers() if name.rsplit('.', 1)[-1] in FLOAT32_BUFFERS}
    policy.to(device=device, dtype=dtype)
    for name, buf in keep.items():
        owner, _, attr = name.rpartition('.')
        policy.get_submodule(owner)._buffers[attr] = buf.to(device=device, dtype=torch.float32)
    return policy


def drop_text_table(policy) -> None:
    """Replace the backbone's text-embedding weight by an empty one, in place. The engines look text ids up in the
    host tables (runtime.tables); the passes take embeddings, so the module's [vocab, hidden] copy (0.54 GB at the
    Qwen2.5-0.5B shape in fp32) would only occupy the device. The policy can no longer embed text afterwards."""
    import torch

    emb = policy.llm.get_input_embeddings()
    emb.weight = torch.nn.Parameter(emb.weight.new_empty((0, emb.weight.shape[1])), requires_grad=False)


class _SlotCache(KVCache):
    """KVCache over a torch buffer whose commits are one `index_copy_` along the slot axis, in place."""

    def __init__(self, buffer, max_len: int):
        import torch

        super().__init__(buffer, max_len)
        self.slots = torch.arange(self.max_len, device=buffer.device)  # [T_max]: index views, never reallocated

    def _copy(self, start: int, kv, count: int) -> None:
        # kv [layers, 2, kv_heads, n >= count, head_dim] -> slots start .. start+count-1
        self.buffer.index_copy_(3, self.slots[start:start + count], kv[:, :, :, :count])


class _Pass:
    """Static buffers of one token count n (shapes from its first call) and, once captured, its CUDA graph."""

    def __init__(self, engine: 'StaticTorchEngine', embeds, positions, mask, capture: bool):
        torch, dev = engine.torch, engine.device
        n = embeds.shape[1]
        self.embeds = torch.zeros(embeds.shape, dtype=engine.dtype, device=dev)  # [1, n, hidden]
        self.positions = torch.zeros(positions.shape, dtype=torch.int64, device=dev)  # [1, n] or [3, 1, n]
        self.mask = torch.zeros(mask.shape, dtype=torch.bool, device=dev)  # [K, 1, n, T_max + n]
        self.logits = torch.zeros((n, engine.config.n_bins), dtype=torch.float32, device=dev)  # [n, n_bins]
        layers, kv_heads, head_dim = engine.kv_shape
        self.new_kv = torch.zeros((layers, 2, kv_heads, n, head_dim), dtype=engine.dtype, device=dev)
        self.capture = capture  # capture on the next run (cleared after a capture or a failed one)
        self.graph = None
        self.runs = 0

    def load(self, embeds, positions, mask) -> None:
        """Copy one call's host arrays into the static inputs (casting embeds to the weights' dtype)."""
        import torch

        for buf, value in ((self.embeds, embeds), (self.positions, positions), (self.mask, mask)):
            buf.copy_(torch.from_numpy(np.ascontiguousarray(value)))


class StaticTorchEngine(Engine):
    name = 'torch'

    def __init__(self, policy, device: str = 'cpu', dtype: str = 'float32', cuda_graphs: bool = True,
                 reuse_instruction: bool = True):
        import torch

        from ..model.graphs import BackboneGraph, VisionGraph, past_inputs, tables

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        if self.device.type == 'cuda' and self.device.index is None:
            self.device = torch.device('cuda', torch.cuda.current_device())
        arrays = {k: v.numpy() for k, v in tables(policy).items()}  # float32, before any cast
        if self.device.type != 'cpu' or self.dtype != torch.float32:
            drop_text_table(policy)  # `arrays` holds it on the host; a device / cast copy would never be read
        self.policy = cast_policy(policy, self.device, self.dtype).eval()  # in place, like TorchEngine's move
        self.vision, self.backbone = VisionGraph(self.policy), BackboneGraph(self.policy)
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == 'cuda'
        self.captured_shapes = set(token_counts(policy.config)) if self.cuda_graphs else set()
        self._passes = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None  # shared by every graph
        self.eager_passes = 0  # passes that ran without a graph (any device)
        super().__init__(policy.config, policy.kv_shape, Tables(arrays), reuse_instruction=reuse_instruction)
        self.cache = _SlotCache(self.cache.buffer, self.cache.max_len)
        self._past = past_inputs(self.cache.buffer)  # per-layer views: the graph reads the cache in place

    # --- Engine hooks -----------------------------------------------------------------------------------------
    def _alloc(self, shape):
        return self.torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _vision(self, pixels):
        with self.torch.inference_mode():
            x = self.torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, self.dtype)
            return self.vision(x).float().cpu().numpy()

    def _backbone(self, embeds, positions, mask, rows):
        n = embeds.shape[1]
        p = self._passes.get(n)
        if p is None:
            p = self._passes[n] = _Pass(self, embeds, positions, mask, capture=n in self.captured_shapes)
        with self.torch.inference_mode():
            p.load(embeds, positions, mask)
            self._run(p)
            logits = p.logits.cpu().numpy()
        return logits[rows], p.new_kv  # every row computed (one static shape per n), `rows` read; a copy

    # --- one pass -------------------------------------------------------------------------------------------
    def _forward(self, p: _Pass) -> None:
        """The backbone from the static inputs (and the cache) into the static outputs."""
        logits, new_kv = self.backbone(p.embeds, p.positions, p.mask, None, self._past)  # all n rows
        p.logits.copy_(logits[0])
        p.new_kv.copy_(new_kv)

    def _run(self, p: _Pass) -> None:
        if p.capture:
            self._capture(p)
        if p.graph is not None:
            p.graph.replay()
        else:
            self._forward(p)
            self.eager_passes += 1
        p.runs += 1

    def _capture(self, p: _Pass) -> None:
        """Warm up on a side stream, then record one `_forward` of pass `p` into a CUDA graph (replayed by `_run`)."""
        torch = self.torch
        p.capture = False
        stream = None
        try:
            stream = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self._forward(p)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode='thread_local'):
                self._forward(p)
            p.graph = graph
        except Exception as e:  # noqa: BLE001 - capture is an optimization; eager gives the same result
            if stream is not None:  # torch.cuda.graph's __exit__ leaves its capture stream current when capture_end
                torch.cuda.set_stream(stream)  # raises (torch 2.11 .. 2.13): the eager passes go back to this one
            log.warning('CUDA graph capture failed for %d tokens (%s); that pass shape runs eagerly',
                        p.embeds.shape[1], e)
            p.graph = None

    def synchronize(self) -> None:
        if self.device.type == 'cuda':
            self.torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        graphs = sorted(n for n, p in self._passes.items() if p.graph is not None)
        return {'engine': self.name, 'device': str(self.device), 'dtype': str(self.dtype).replace('torch.', ''),
                'cuda_graphs': self.cuda_graphs, 'captured_shapes': graphs, 'eager_passes': self.eager_passes,
                'reuse_text_kv': self.reuse_instruction}
