"""OrtEngine: ONNX Runtime over a policy folder; IO binding throughout, nothing allocated per step.

CPU (default): every input/output is a preallocated numpy array wrapped once as an OrtValue that shares its
memory, so the KV cache, `kv_valid` and the step outputs are read and written in place.
CUDA provider (`device='cuda'`): the large tensors (KV cache, new K/V, image tokens, instruction K/V) live in
CUDA OrtValues and slot writes are device-to-device copies (cuda-python); small inputs and the logits stay on
the host. After creating any session the provider actually in use is logged; with `require_gpu` a fallback
to the CPU raises GPUUnavailableError.
Importing or running this engine never imports torch.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from .engine_factory import GPUUnavailableError
from .graph_engine import SHARED_INPUTS, SHARED_OUTPUTS, GraphCall, GraphEngine, check_io
from .policy_folder import PolicyFolderError, PolicySpec, TensorSpec

log = logging.getLogger(__name__)

DEVICE_TENSORS = ('kv', 'new_kv', 'image_tokens', 'text_kv')  # kept on the GPU with the CUDA provider
_ORT_TYPES = {'tensor(float)': np.float32, 'tensor(int64)': np.int64, 'tensor(bool)': np.bool_,
              'tensor(float16)': np.float16, 'tensor(int32)': np.int32}


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("engine 'onnxruntime' needs the onnxruntime package: pip install onnxruntime "
                          '(or onnxruntime-gpu for the CUDA provider)') from e
    return ort


class _OrtGraph(GraphCall):
    def __init__(self, engine: 'OrtEngine', key: str):
        ort = engine.ort
        spec = engine.spec.graphs[key]
        where = str(engine.spec.path(key))
        self.session = engine.create_session(key)
        for io, tensors in (('input', self.session.get_inputs()), ('output', self.session.get_outputs())):
            listed = spec.inputs if io == 'input' else spec.outputs
            if [t.name for t in tensors] != [t.name for t in listed]:
                raise PolicyFolderError(f'{where}: {io}s {[t.name for t in tensors]} differ from policy.yaml '
                                        f'{[t.name for t in listed]}')
            for t, s in zip(tensors, listed):
                check_io(s, t.shape, _ORT_TYPES.get(t.type, np.float64), where)
        self.binding = self.session.io_binding()
        self.buffers, self._values = {}, []
        for t in spec.inputs:
            buf = engine.shared_buffer(t) if t.name in SHARED_INPUTS else engine.io_buffer(t)
            self._bind(ort, t.name, buf, self.binding.bind_ortvalue_input)
        for t in spec.outputs:
            buf = engine.shared_buffer(t) if t.name in SHARED_OUTPUTS else engine.io_buffer(t)
            self._bind(ort, t.name, buf, self.binding.bind_ortvalue_output)

    def _bind(self, ort, name, buf, bind):
        value = ort.OrtValue.ortvalue_from_numpy(buf) if isinstance(buf, np.ndarray) else buf._owner
        self._values.append(value)  # the OrtValue shares the numpy memory: keep it alive
        bind(name, value)
        self.buffers[name] = buf

    def feed(self, name, array):
        buf = self.buffers[name]
        if buf is array:
            return
        if isinstance(buf, np.ndarray):
            np.copyto(buf, np.asarray(array).reshape(buf.shape), casting='same_kind')
        else:
            buf.copy_from_host(array)

    def run(self):
        self.session.run_with_iobinding(self.binding)

    def host(self, name):
        buf = self.buffers[name]
        return buf if isinstance(buf, np.ndarray) else buf.copy_to_host()

    def buffer(self, name):
        return self.buffers[name]


class OrtEngine(GraphEngine):
    name = 'onnxruntime'

    def __init__(self, spec: PolicySpec, device: str = 'cpu', threads: Optional[int] = None,
                 require_gpu: bool = False, reuse_text_kv: bool = True):
        if device not in ('cpu', 'cuda'):
            raise ValueError(f"OrtEngine device must be 'cpu' or 'cuda', got {device!r}")
        self.ort = import_onnxruntime()
        self.device = device
        self.threads = threads
        self.require_gpu = bool(require_gpu)
        self.provider = None  # the provider actually in use (after the first session)
        self.device_buffers = False
        self._pending = {}
        self.name = 'onnxruntime-cuda' if device == 'cuda' else 'onnxruntime'
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

    def create_session(self, key: str):
        if key in self._pending:  # opened early (see _start)
            return self._pending.pop(key)
        path = self.spec.path(key)
        sess = self.ort.InferenceSession(str(path), sess_options=self.session_options(),
                                         providers=self._providers())
        used = sess.get_providers()
        log.info('onnxruntime session %s (%s): providers in use %s', key, path.name, used)
        if self.provider is None:
            self.provider = used[0]
        if self.device == 'cuda' and used[0] != 'CUDAExecutionProvider':
            msg = (f"engine 'onnxruntime-cuda': graph {key} fell back to {used[0]} (CUDA provider not usable; "
                   'check the CUDA/cuDNN libraries)')
            if self.require_gpu:
                raise GPUUnavailableError(msg + "; use engine 'onnxruntime' for the CPU")
            log.warning(msg)
        return sess

    # --- buffers ----------------------------------------------------------------------------------------------
    def _start(self):
        # open the vision graph first: the provider actually in use decides host or device buffers
        self._pending = {}
        self._pending['vision'] = self.create_session('vision')
        if self.provider == 'CUDAExecutionProvider':
            try:
                from .cuda_memory import cudart

                cudart()
                self.device_buffers = True
            except ImportError as e:
                log.warning('%s; the KV cache stays in host memory (copied to the GPU every step)', e)

    def _device_array(self, shape, dtype):
        from .cuda_memory import DeviceArray

        value = self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type, 'cuda', 0)
        arr = DeviceArray(shape, dtype, ptr=value.data_ptr(), owner=value)
        arr.zero()
        return arr

    def _alloc(self, shape):
        return self._device_array(shape, np.float32) if self.device_buffers else np.zeros(shape, np.float32)

    def io_buffer(self, t: TensorSpec):
        if self.device_buffers and t.name in DEVICE_TENSORS:
            return self._device_array(t.shape, np.dtype(t.dtype))
        return np.zeros(t.shape, np.dtype(t.dtype))

    def _new_buffer(self, t: TensorSpec):
        return self.io_buffer(t)

    def _open(self, key):
        return _OrtGraph(self, key)

    def describe(self) -> dict:
        return {'engine': self.name, 'provider': self.provider, 'device': 'cuda:0' if self.provider ==
                'CUDAExecutionProvider' else 'cpu', 'threads': self.threads, 'device_buffers': self.device_buffers,
                'reuse_text_kv': self.reuse_text_kv}
