"""TrtEngine: TensorRT 10 over a policy folder (one engine per graph, built from its ONNX files, cached per GPU).

Memory is cuda-python (cudaMalloc'd DeviceArray buffers, one stream), not torch. The backbone engine carries the
optimization profiles of `runtime.tensorrt_profiles`; each profile gets its own execution context (all sharing one
scratch buffer), so a pass never switches profiles. Every `past_*` input is bound to its layer's slice of the one
device KV cache; per token count n, the embeds / positions / mask / logits / new_kv buffers are allocated once and
bound with `set_tensor_address`; calls use `execute_async_v3`. A pass shape with its own (exact) profile is
captured into a CUDA graph on its second call and replayed from then on; the range profile's widths run plainly
(`cuda_graphs=False` turns capture off; a failed capture falls back to plain execution with a warning). Without a
GPU the constructor fails at once.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from .engine_factory import require_cuda_device
from .graph_engine import GraphEngine, check_io
from .policy_folder import PolicyFolderError, PolicySpec
from .tensorrt_profiles import pick_profile

log = logging.getLogger(__name__)
DYNAMIC_INPUTS = ('embeds', 'positions', 'mask', 'logit_rows')  # inputs whose shape follows n (the cache: T_max)


class _Pass:
    """Device buffers of one token count n, bound on the context of its profile; optionally a CUDA graph."""

    def __init__(self, owner: 'TrtEngine', n: int):
        from .cuda_memory import DeviceArray

        spec = owner.spec.graphs['backbone']
        self.index = pick_profile(owner.profiles, n)
        self.context = owner.contexts[self.index]
        t_max = owner.cache.max_len  # every pass reads the whole cache (static shapes: one CUDA graph per n)
        self.buffers = {t.name: DeviceArray(t.concrete(n, t_max), np.dtype(t.dtype)) for t in spec.inputs + spec.outputs
                        if not t.name.startswith('past_')}
        self.past_shape = (1, *owner.cache.buffer.shape[2:])  # [1, kv_heads, T_max, head_dim]
        if 'logit_rows' in self.buffers:  # every row's logits (one static shape per n); the host reads those it needs
            self.buffers['logit_rows'].copy_from_host(np.arange(n, dtype=np.int64))
        self.logits_host = np.empty(self.buffers['logits'].shape, self.buffers['logits'].dtype)
        self.graph_exec, self.runs = None, 0
        # only a pass with its own (exact) profile is captured: the range profile's context is re-bound to another
        # shape whenever its n changes, and a capture right after a re-bind would record TensorRT's first run at the
        # new shapes (TensorRT wants one plain enqueue after a shape change before a capture); those passes are the
        # real-time-chunking carries, which the torch engine also runs eagerly
        self.use_graph = owner.cuda_graphs and owner.profiles[self.index].exact

    def bind(self, owner: 'TrtEngine') -> None:
        for name, buf in self.buffers.items():
            if name in DYNAMIC_INPUTS and not self.context.set_input_shape(name, buf.shape):
                raise RuntimeError(f'TensorRT rejected shape {buf.shape} for {name}')
            if not self.context.set_tensor_address(name, buf.ptr):
                raise RuntimeError(f'TensorRT set_tensor_address failed for {name}')
        for name, ptr in owner.past_ptrs.items():
            if not self.context.set_input_shape(name, self.past_shape):  # a 'past' dim: profiles fix it at T_max
                raise RuntimeError(f'TensorRT rejected shape {self.past_shape} for {name}')
            self.context.set_tensor_address(name, ptr)


class TrtEngine(GraphEngine):
    name = 'tensorrt'

    def __init__(self, spec: PolicySpec, fp16: bool = False, cache_dir: Optional[str] = None,
                 cuda_graphs: bool = True, reuse_text_kv: bool = True, device_id: int = 0):
        require_cuda_device("engine 'tensorrt'")  # fails at once, naming the ONNX Runtime alternative
        if spec.precision not in ('fp32', 'fp16'):
            raise PolicyFolderError(f"{spec.folder}: a {spec.precision} policy (MatMulNBits) runs on engine "
                                    "'onnxruntime' only; export fp32 or fp16 for TensorRT")
        from .cuda_memory import check, cudart, device_identity
        from .tensorrt_build import EngineStore, import_tensorrt

        self.trt = import_tensorrt()
        check(cudart().cudaSetDevice(int(device_id)))
        self.device_id = int(device_id)
        self.fp16 = bool(fp16)
        self.cuda_graphs = bool(cuda_graphs)
        self.gpu = device_identity(self.device_id)
        self.store = EngineStore(self.trt, spec, self.gpu, fp16=self.fp16, cache_dir=cache_dir)
        self._passes = {}
        self._bound = {}  # profile index -> the token count its context is bound for
        super().__init__(spec, reuse_text_kv=reuse_text_kv)
        self.past_ptrs = self._past_pointers()

    # --- engines ----------------------------------------------------------------------------------------------
    def _start(self):
        from .cuda_memory import DeviceArray

        trt = self.trt
        self.vision_engine = self._load('vision')
        self.vision_context = self.vision_engine.create_execution_context()
        self.vision_buffers = {t.name: DeviceArray(t.shape, np.dtype(t.dtype))
                               for t in self.spec.graphs['vision'].inputs + self.spec.graphs['vision'].outputs}
        for name, buf in self.vision_buffers.items():
            self.vision_context.set_tensor_address(name, buf.ptr)
        self.backbone_engine = self._load('backbone')
        self.profiles = self.store.profiles('backbone')
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts = [self.backbone_engine.create_execution_context(strategy) for _ in self.profiles]
        if any(c is None for c in self.contexts):
            raise RuntimeError('TensorRT could not create the backbone execution contexts (GPU memory?)')
        size = getattr(self.backbone_engine, 'device_memory_size_v2', None) or self.backbone_engine.device_memory_size
        self.scratch = DeviceArray((max(int(size), 1),), np.uint8)  # one scratch buffer, shared by every context
        from .cuda_memory import stream

        for i, context in enumerate(self.contexts):
            context.set_optimization_profile_async(i, int(stream()))
            context.set_device_memory(self.scratch.ptr, self.scratch.nbytes)

    def _load(self, key: str):
        engine = self.store.load_or_build(key)
        trt, gspec, where = self.trt, self.spec.graphs[key], str(self.spec.path(key))
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        specs = {t.name: t for t in gspec.inputs + gspec.outputs}
        if sorted(names) != sorted(specs):
            raise PolicyFolderError(f'{where}: engine tensors {names} differ from policy.yaml {sorted(specs)}')
        for name in names:
            dims = [d if d >= 0 else specs[name].shape[i] for i, d in enumerate(engine.get_tensor_shape(name))]
            check_io(specs[name], dims, trt.nptype(engine.get_tensor_dtype(name)), where)
        return engine

    def _past_pointers(self) -> dict:
        buf = self.cache.buffer
        per = buf.nbytes // (buf.shape[0] * buf.shape[1])  # bytes of one [kv_heads, T, head_dim] slice
        return {name: buf.ptr + (layer * buf.shape[1] + kind) * per for name, layer, kind in self.past_views()}

    def open_all(self) -> None:
        """Engines are built (or loaded from the cache) in the constructor: nothing left to open."""

    # --- Engine hooks -----------------------------------------------------------------------------------------
    def _alloc(self, shape):
        from .cuda_memory import DeviceArray

        return DeviceArray(shape, np.dtype(self.spec.float_dtype))

    def _vision(self, pixels):
        from .cuda_memory import stream

        self.vision_buffers['pixels'].copy_from_host(pixels, sync=False)
        if not self.vision_context.execute_async_v3(int(stream())):
            raise RuntimeError('TensorRT execute_async_v3 failed for the vision graph')
        return self.vision_buffers['image_tokens'].copy_to_host()

    def _backbone(self, embeds, positions, mask, rows):
        n = embeds.shape[1]
        p = self._passes.get(n)
        if p is None:
            p = self._passes[n] = _Pass(self, n)
        if self._bound.get(p.index) != n:  # the range profile's context serves several n
            p.bind(self)
            self._bound[p.index] = n
        for name, value in (('embeds', embeds), ('positions', positions), ('mask', mask)):
            p.buffers[name].copy_from_host(value, sync=False)  # ordered on the engine's stream
        self._run(p)
        p.buffers['logits'].copy_to_host(p.logits_host)  # synchronizes the stream
        return p.logits_host[0, rows].astype(np.float32), p.buffers['new_kv']

    def _run(self, p: _Pass) -> None:
        from .cuda_memory import check, cudart, stream

        if p.use_graph and p.graph_exec is None and p.runs >= 1:
            self._capture(p)
        if p.graph_exec is not None:
            check(cudart().cudaGraphLaunch(p.graph_exec, stream()))
        elif not p.context.execute_async_v3(int(stream())):
            raise RuntimeError('TensorRT execute_async_v3 failed for the backbone')
        p.runs += 1

    def _capture(self, p: _Pass) -> None:
        """Record one execution of pass `p` into a CUDA graph (not executed now; `_run` launches it)."""
        from .cuda_memory import check, cudart, stream

        rt, s = cudart(), stream()
        try:
            check(rt.cudaStreamBeginCapture(s, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
            try:
                ok = p.context.execute_async_v3(int(s))
            finally:
                graph = check(rt.cudaStreamEndCapture(s))
            if not ok:
                raise RuntimeError('execute_async_v3 failed while capturing')
            p.graph_exec = check(rt.cudaGraphInstantiate(graph, 0))
            check(rt.cudaGraphDestroy(graph))
        except Exception as e:  # noqa: BLE001 - capture is an optimization
            log.warning('CUDA graph capture failed for %d tokens (%s); running it without CUDA graphs',
                        p.buffers['embeds'].shape[1], e)
            p.use_graph, p.graph_exec = False, None

    def describe(self) -> dict:
        return {'engine': self.name, 'provider': f'TensorRT {self.trt.__version__}',
                'device': f'cuda:{self.device_id} ({self.gpu["name"]}, sm {self.gpu["compute_capability"]})',
                'precision': 'fp16' if self.fp16 else 'fp32', 'cuda_graphs': self.cuda_graphs,
                'profiles': len(self.profiles), 'engine_cache': str(self.store.cache_dir),
                'reuse_text_kv': self.reuse_instruction}
