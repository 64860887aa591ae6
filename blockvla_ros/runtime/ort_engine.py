"""OrtEngine: ONNX Runtime over a policy folder; IO binding throughout, nothing allocated per pass.

CPU (default): the KV cache is one numpy buffer; each `past_*` input of the backbone is an OrtValue over its
layer's slice (shared memory: the graph reads the cache in place), and the committed slots of `new_kv` are copied
into it. Per pass shape (token count n, cache slots read, logit rows m), the embeds / positions / mask / logit_rows
inputs and the logits / new_kv outputs are numpy buffers bound once (an IO binding per shape) and reused (a folder
exported before `logit_rows` existed computes every row; the engine returns the rows asked for). On a graph whose
cache inputs have a 'past' dim (`dynamic_past`), a prefix pass reads only the `lo` slots before it: their K/V (the
instruction's, or one masked slot) are copied into a small buffer of that length, so no query scores the empty rest
of the cache. On the CPU the backbone's rotary embeddings run as ONNX Runtime's fused RotaryEmbedding op
(`runtime.ort_rotary`, rewritten in memory when the session is built; the folder keeps the standard graph;
`fuse_rotary=False` opens it as exported).
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


class _Pass:
    """The IO binding of one pass shape: n tokens reading `past` cache slots, logits for m of them (a graph without
    `logit_rows`: all n). Input/output buffers are bound once; the cache is bound by reference (past = T_max), or a
    small copy of its first `past` slots (`OrtEngine.head`)."""

    def __init__(self, engine: 'OrtEngine', n: int, past: int, m: int):
        spec = engine.spec.graphs['backbone']
        ort = engine.ort
        self.binding = engine.backbone.io_binding()
        self._keep = []
        source = engine.cache.buffer if past == engine.cache.max_len else engine.head(past)
        for name, layer, kind in engine.past_views():
            engine.bind_cache(self.binding, name, layer, kind, self._keep, source)
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
                 require_gpu: bool = False, reuse_text_kv: bool = True, fuse_rotary: bool = True):
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
        self.name = 'onnxruntime-cuda' if device == 'cuda' else 'onnxruntime'
        self._passes = {}
        self._heads = {}  # past -> [layers, 2, kv_heads, past, head_dim] copies of the cache's first slots
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
        """The session of graph `key`; the backbone with its rotary embeddings fused where that applies (an ONNX
        Runtime that cannot load the fused graph gets the graph as exported, with a warning)."""
        fused = None
        if key == 'backbone' and self.fuse_rotary:
            fused, self.rotary_fused = fused_backbone(path)
        if fused is not None:
            so = self.session_options()  # loaded from bytes: its external data is read from the folder as before
            so.add_session_config_entry('session.model_external_initializers_file_folder_path', str(path.parent))
            try:
                return self.ort.InferenceSession(fused, sess_options=so, providers=self._providers())
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                log.warning('%s: ONNX Runtime cannot load the graph with fused rotary embeddings (%s); running it as '
                            'exported', path, e)
                self.rotary_fused = 0
        return self.ort.InferenceSession(str(path), sess_options=self.session_options(), providers=self._providers())

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
        for io, tensors, listed in (('input', sess.get_inputs(), gspec.inputs),
                                    ('output', sess.get_outputs(), gspec.outputs)):
            if [t.name for t in tensors] != [t.name for t in listed]:
                raise PolicyFolderError(f'{path}: {io}s {[t.name for t in tensors]} differ from policy.yaml '
                                        f'{[t.name for t in listed]}')
            for t, s in zip(tensors, listed):
                check_io(s, t.shape, _ORT_TYPES.get(t.type, np.float64), str(path))
        return sess, used[0]

    def _start(self):
        self.vision, self.provider = self._session('vision')
        self.backbone, _ = self._session('backbone')
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

    def head(self, past: int):
        """The buffer a pass reading only the cache's first `past` slots is bound to (`_backbone` fills it)."""
        if past not in self._heads:
            layers, kv_heads, head_dim = self.kv_shape
            self._heads[past] = self._alloc((layers, 2, kv_heads, past, head_dim))
        return self._heads[past]

    def bind_cache(self, binding, name: str, layer: int, kind: int, keep: list, buf=None) -> None:
        """Bind input `name` to the slice [layer, kind] of the cache (or of `buf`): [1, kv_heads, slots, head_dim],
        no copy."""
        buf = self.cache.buffer if buf is None else buf
        if isinstance(buf, np.ndarray):
            value = self.ort.OrtValue.ortvalue_from_numpy(buf[layer, kind][None])
            keep.append(value)
            binding.bind_ortvalue_input(name, value)
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
        if past != self.cache.max_len:  # a prefix pass reading the first `past` slots: their copy (tens of slots)
            self.head(past)[:, :, :, 0:past] = self.cache.buffer[:, :, :, 0:past]
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
                'rotary_fused': self.rotary_fused}
