"""OrtEngine: ONNX Runtime over a policy folder; IO binding throughout, nothing allocated per pass.

CPU (default): the KV cache is one numpy buffer; each `past_*` input of the backbone is an OrtValue over its
layer's slice (shared memory: the graph reads the cache in place), and the committed slots of `new_kv` are copied
into it. Per pass shape (token count n, cache slots read, logit rows m), the embeds / positions / mask / logit_rows
inputs and the logits / new_kv outputs are numpy buffers bound once (an IO binding per shape) and reused (a folder
exported before `logit_rows` existed computes every row; the engine returns the rows asked for). On a graph whose
cache inputs have a 'past' dim (`dynamic_past`), a prefix pass reads only the `lo` slots before it: their K/V (the
instruction's, or one masked slot) are copied into a small buffer of that length, so no query scores the empty rest
of the cache. On the CPU the backbone's rotary embeddings run as ONNX Runtime's fused RotaryEmbedding op
(`runtime.ort_rotary`) and each layer's attention core as one GroupQueryAttention (`runtime.ort_attention`), both
rewritten in memory when the session is built (the folder keeps the standard graph; `fuse_rotary=False` /
`fuse_attention=False` open it without them). GroupQueryAttention writes a pass's K/V into the slots after the ones
it reads, in the buffer it reads: the cache then has `spare_slots` slots after its T_max (never committed to), a
prefix pass's small copy has room for its n tokens, and each fused layer's present output is bound to its past input.
The layer left as exported (the last: it scores the logit rows only) reads exactly the slots a pass reads, from a
copy of its own K/V the cache keeps beside the main buffer (`_SpareSlotsCache`).
CUDA provider (`device='cuda'`): the cache and `new_kv` live in CUDA memory, bound by pointer; slot writes are
device-to-device copies (cuda-python); the small inputs and the logits stay on the host. After creating the
sessions the provider actually in use is logged; with `require_gpu` a fallback to the CPU raises
GPUUnavailableError.
Importing or running this engine never imports torch.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from .engine_factory import GPUUnavailableError
from .graph_engine import GraphEngine, check_io
from .kv_cache import KVCache
from .ort_attention import PRESENT, fused_layers, gqa_supported
from .ort_rotary import fused_backbone
from .policy_folder import PolicyFolderError, PolicySpec

log = logging.getLogger(__name__)

_ORT_TYPES = {'tensor(float)': np.float32, 'tensor(int64)': np.int64, 'tensor(bool)': np.bool_,
              'tensor(float16)': np.float16, 'tensor(int32)': np.int32}


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("engine 'onnxruntime' needs the onnxruntime package: pip install onnxruntime "
                          '(or onnxruntime-gpu for the CUDA provider)') from e
    return ort


class _SpareSlotsCache(KVCache):
    """The cache of an engine with fused attention: `buffer` [layers, 2, kv_heads, T_max + spare, head_dim] (its
    fused layers' kernels write a pass's K/V into the slots after the ones they read) and `plain` [len(plain_layers),
    2, kv_heads, T_max, head_dim], the K/V of the layers left as exported (their inputs are exactly the slots a pass
    reads), written alike."""

    def __init__(self, buffer, max_len: int, plain_layers: list, plain):
        super().__init__(buffer, max_len)
        self.plain_layers, self.plain = list(plain_layers), plain

    def _copy(self, start: int, kv, count: int) -> None:
        super()._copy(start, kv, count)
        for j, layer in enumerate(self.plain_layers):
            self.plain[j, :, :, start:start + count] = kv[layer, :, :, :count]


class _Pass:
    """The IO binding of one pass shape: n tokens reading `past` cache slots, logits for m of them (a graph without
    `logit_rows`: all n). Input/output buffers are bound once; the cache is bound by reference (past = T_max), or a
    small copy of its first `past` slots (`OrtEngine.head`, refreshed before each run: `self.head`). With the
    attention fused, each fused layer's present output is bound to its past input (the kernel writes slots [past,
    past + n)), and the other layers read the cache's `plain` buffer (or a copy of its first `past` slots)."""

    def __init__(self, engine: 'OrtEngine', n: int, past: int, m: int):
        spec = engine.spec.graphs['backbone']
        ort = engine.ort
        self.binding = engine.backbone.io_binding()
        self._keep = []
        fused, cache, T = engine.gqa_layers, engine.cache, engine.cache.max_len
        whole = past == T and (not fused or n <= engine.spare_slots)
        self.head = None if whole else engine.head(past, n)
        self.plain_head = engine.head(past, plain=True) if fused and past != T else None
        source = cache.buffer if whole else self.head
        plain = {layer: j for j, layer in enumerate(cache.plain_layers)} if fused else {}
        for name, layer, kind in engine.past_views():
            if layer in plain:
                engine.bind_cache(self.binding, name, plain[layer], kind, self._keep,
                                  cache.plain if self.plain_head is None else self.plain_head)
                continue
            value = engine.bind_cache(self.binding, name, layer, kind, self._keep, source)
            if layer in fused:
                self.binding.bind_ortvalue_output(PRESENT + name[len('past_'):], value)
        self.inputs = {t.name: np.zeros(t.concrete(n, past, m), np.dtype(t.dtype)) for t in spec.inputs
                       if t.name in ('embeds', 'positions', 'mask', 'logit_rows')}
        self.logits = np.zeros(spec.tensor('logits').concrete(n, past, m), np.dtype(spec.tensor('logits').dtype))
        for name, buf in list(self.inputs.items()) + [('logits', self.logits)]:
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            self._keep.append(value)
            (self.binding.bind_ortvalue_output if name == 'logits' else self.binding.bind_ortvalue_input)(name, value)
        new_kv = spec.tensor('new_kv')
        self.new_kv = engine.new_buffer(new_kv.concrete(n), np.dtype(new_kv.dtype))
        engine.bind_output(self.binding, 'new_kv', self.new_kv, self._keep)


class OrtEngine(GraphEngine):
    name = 'onnxruntime'

    def __init__(self, spec: PolicySpec, device: str = 'cpu', threads: Optional[int] = None,
                 require_gpu: bool = False, reuse_text_kv: bool = True, fuse_rotary: bool = True,
                 fuse_attention: bool = True):
        if device not in ('cpu', 'cuda'):
            raise ValueError(f"OrtEngine device must be 'cpu' or 'cuda', got {device!r}")
        self.ort = import_onnxruntime()
        self.device = device
        self.threads = threads
        self.require_gpu = bool(require_gpu)
        self.provider = None  # the provider actually in use
        self.device_buffers = False
        self.fuse_rotary = bool(fuse_rotary) and device == 'cpu'  # measured on the CPU provider only
        self.rotary_fused = 0  # rotary groups the backbone session runs fused
        self.fuse_attention = bool(fuse_attention) and device == 'cpu'
        self.spare_slots = 0  # cache slots after T_max (GroupQueryAttention writes a pass's K/V there)
        self.gqa_layers = set()  # layers whose attention the backbone session runs as GroupQueryAttention
        self.name = 'onnxruntime-cuda' if device == 'cuda' else 'onnxruntime'
        self._passes = {}
        self._heads = {}  # (slots, plain) -> [layers, 2, kv_heads, slots, head_dim]: copies of the cache's first slots
        super().__init__(spec, reuse_text_kv=reuse_text_kv)

    # --- sessions ---------------------------------------------------------------------------------------------
    def _providers(self) -> list:
        if self.device == 'cpu':
            return ['CPUExecutionProvider']
        available = self.ort.get_available_providers()
        if 'CUDAExecutionProvider' not in available:
            msg = (f"engine 'onnxruntime-cuda': this onnxruntime build has no CUDAExecutionProvider (available: "
                   f"{available}); install onnxruntime-gpu on a machine with an NVIDIA GPU")
            if self.require_gpu:
                raise GPUUnavailableError(msg + ", or use engine 'onnxruntime' (CPU)")
            log.warning('%s; running on the CPU', msg)
            return ['CPUExecutionProvider']
        return [('CUDAExecutionProvider', {'device_id': 0}), 'CPUExecutionProvider']

    def session_options(self):
        so = self.ort.SessionOptions()
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        so.log_severity_level = 3
        return so

    def _open(self, key: str, path):
        """The session of graph `key`; the backbone with its rotary embeddings and attention fused where that
        applies (an ONNX Runtime that cannot load a rewritten graph gets the next simpler one, with a warning)."""
        if key == 'backbone':
            fusable = self._attention_fusable()  # then, if that graph is refused, without the attention fused
            for rotary, attention in [(self.fuse_rotary, fusable)] + [(self.fuse_rotary, False)] * fusable:
                if not (rotary or attention):
                    break
                fused, self.rotary_fused, layers = fused_backbone(
                    path, rotary=rotary, attention_past=self.past_names if attention else None)
                if fused is None:
                    if attention:
                        continue
                    break
                so = self.session_options()  # loaded from bytes: its external data is read from the folder as before
                so.add_session_config_entry('session.model_external_initializers_file_folder_path', str(path.parent))
                try:
                    return self.ort.InferenceSession(fused, sess_options=so, providers=self._providers())
                except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                    log.warning('%s: ONNX Runtime cannot load the graph with fused %s (%s); trying it without', path,
                                'attention' if layers else 'rotary embeddings', e)
                    self.rotary_fused = 0
        return self.ort.InferenceSession(str(path), sess_options=self.session_options(), providers=self._providers())

    @property
    def attention_fused(self) -> int:
        """How many layers' attention the backbone session runs as GroupQueryAttention (read off its outputs)."""
        return len(self.gqa_layers)

    def _attention_fusable(self) -> bool:
        """GroupQueryAttention needs the cache inputs' length dynamic (it is bound to T_max + spare slots), a float32
        graph and an ONNX Runtime whose kernel takes causal = 0."""
        if not self.fuse_attention:
            return False
        backbone = self.spec.graphs['backbone']
        if 'past' not in backbone.tensor(self.past_names[0]).symbols or np.dtype(self.spec.float_dtype) != np.float32:
            return False
        if not gqa_supported(self.ort):
            log.info('this ONNX Runtime (%s) has no GroupQueryAttention with causal = 0; attention runs as exported',
                     self.ort.__version__)
            return False
        return True

    def _session(self, key: str):
        path = self.spec.path(key)
        try:
            sess = self._open(key, path)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise PolicyFolderError(f'{path}: ONNX Runtime cannot load it ({e})') from e
        used = sess.get_providers()
        log.info('onnxruntime session %s (%s): providers in use %s', key, path.name, used)
        if self.device == 'cuda' and used[0] != 'CUDAExecutionProvider':
            msg = (f"engine 'onnxruntime-cuda': graph {key} fell back to {used[0]} (CUDA provider not usable; "
                   'check the CUDA/cuDNN libraries)')
            if self.require_gpu:
                raise GPUUnavailableError(msg + "; use engine 'onnxruntime' for the CPU")
            log.warning(msg)
        gspec = self.spec.graphs[key]
        outputs = [t for t in sess.get_outputs() if not t.name.startswith(PRESENT)]  # ort_attention's, bound in place
        for io, tensors, listed in (('input', sess.get_inputs(), gspec.inputs), ('output', outputs, gspec.outputs)):
            if [t.name for t in tensors] != [t.name for t in listed]:
                raise PolicyFolderError(f'{path}: {io}s {[t.name for t in tensors]} differ from policy.yaml '
                                        f'{[t.name for t in listed]}')
            for t, s in zip(tensors, listed):
                check_io(s, t.shape, _ORT_TYPES.get(t.type, np.float64), str(path))
        return sess, used[0]

    def _start(self):
        self.vision, self.provider = self._session('vision')
        self.backbone, _ = self._session('backbone')
        self.gqa_layers = set(fused_layers(o.name for o in self.backbone.get_outputs()))
        self.dynamic_past = 'past' in self.spec.graphs['backbone'].tensor(self.past_names[0]).symbols
        self.logit_rows = any(t.name == 'logit_rows' for t in self.spec.graphs['backbone'].inputs)
        if self.provider == 'CUDAExecutionProvider':
            try:
                from .cuda_memory import cudart

                cudart()
                self.device_buffers = True
            except ImportError as e:
                log.warning('%s; the KV cache stays in host memory (copied to the GPU every pass)', e)

    # --- buffers ----------------------------------------------------------------------------------------------
    def new_buffer(self, shape, dtype):
        if not self.device_buffers:
            return np.zeros(shape, dtype)
        from .cuda_memory import DeviceArray

        return DeviceArray(shape, dtype)

    def _alloc(self, shape):
        return self.new_buffer(shape, np.dtype(self.spec.float_dtype))

    def _new_cache(self, shape: tuple, max_len: int):
        if not self.gqa_layers:
            return super()._new_cache(shape, max_len)
        cfg = self.spec.config  # room for the widest pass after T_max: L actions and two blocks (a fused commit)
        self.spare_slots = cfg.n_action_tokens + 2 * max(cfg.block_sizes)
        plain_layers = [i for i in range(shape[0]) if i not in self.gqa_layers]
        return _SpareSlotsCache(self._alloc((*shape[:3], shape[3] + self.spare_slots, *shape[4:])), max_len,
                                plain_layers, self._alloc((len(plain_layers), *shape[1:])))

    def head(self, past: int, n: int = 0, plain: bool = False):
        """The buffer a pass reading only the cache's first `past` slots is bound to (`_backbone` fills it): of every
        layer, with n more slots for the pass's own K/V when the attention is fused; `plain`: of the cache's plain
        layers, `past` slots."""
        slots = past + (n if self.gqa_layers and not plain else 0)
        if (slots, plain) not in self._heads:
            layers, kv_heads, head_dim = self.kv_shape
            count = len(self.cache.plain_layers) if plain else layers
            self._heads[(slots, plain)] = self._alloc((count, 2, kv_heads, slots, head_dim))
        return self._heads[(slots, plain)]

    def bind_cache(self, binding, name: str, layer: int, kind: int, keep: list, buf=None):
        """Bind input `name` to the slice [layer, kind] of the cache (or of `buf`): [1, kv_heads, slots, head_dim],
        no copy. -> the OrtValue bound (host buffers; None for device buffers)."""
        buf = self.cache.buffer if buf is None else buf
        if isinstance(buf, np.ndarray):
            value = self.ort.OrtValue.ortvalue_from_numpy(buf[layer, kind][None])
            keep.append(value)
            binding.bind_ortvalue_input(name, value)
            return value
        else:
            per = buf.nbytes // (buf.shape[0] * buf.shape[1])
            binding.bind_input(name, 'cuda', 0, buf.dtype.type, [1, *buf.shape[2:]],
                               buf.ptr + (layer * buf.shape[1] + kind) * per)

    def bind_output(self, binding, name: str, buf, keep: list) -> None:
        if isinstance(buf, np.ndarray):
            value = self.ort.OrtValue.ortvalue_from_numpy(buf)
            keep.append(value)
            binding.bind_ortvalue_output(name, value)
        else:
            binding.bind_output(name, 'cuda', 0, buf.dtype.type, list(buf.shape), buf.ptr)

    # --- Engine hooks -----------------------------------------------------------------------------------------
    def _vision(self, pixels):
        dtype = np.dtype(self.spec.graphs['vision'].tensor('pixels').dtype)
        return self.vision.run(['image_tokens'], {'pixels': np.ascontiguousarray(pixels, dtype)})[0]

    def _backbone(self, embeds, positions, mask, rows):
        n = embeds.shape[1]
        past = mask.shape[-1] - n
        m = len(rows) if self.logit_rows else n
        p = self._passes.get((n, past, m))
        if p is None:
            p = self._passes[(n, past, m)] = _Pass(self, n, past, m)
        if p.head is not None:  # a prefix pass reading the first `past` slots: their copy (tens of slots)
            p.head[:, :, :, 0:past] = self.cache.buffer[:, :, :, 0:past]
        if p.plain_head is not None:
            p.plain_head[:, :, :, 0:past] = self.cache.plain[:, :, :, 0:past]
        for name, value in (('embeds', embeds), ('positions', positions), ('mask', mask), ('logit_rows', rows)):
            if name in p.inputs:
                np.copyto(p.inputs[name], value, casting='same_kind')
        self.backbone.run_with_iobinding(p.binding)
        logits = p.logits[0] if self.logit_rows else p.logits[0, rows]  # [m, n_bins]
        return logits.astype(np.float32), p.new_kv  # astype copies: the buffer is reused

    def describe(self) -> dict:
        return {'engine': self.name, 'provider': self.provider, 'device': 'cuda:0' if self.provider ==
                'CUDAExecutionProvider' else 'cpu', 'threads': self.threads, 'device_buffers': self.device_buffers,
                'reuse_text_kv': self.reuse_instruction, 'dynamic_past': self.dynamic_past,
                'rotary_fused': self.rotary_fused, 'attention_fused': self.attention_fused}
