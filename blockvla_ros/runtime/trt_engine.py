"""TrtEngine: TensorRT 10 over a policy folder (engines built from its ONNX graphs, cached per GPU).

Memory is cuda-python (cudaMalloc'd DeviceArray buffers, one stream), not torch. Every tensor is bound once
with `set_tensor_address`; calls use `execute_async_v3`. Step graphs (static shapes and fixed addresses) are
captured into a CUDA graph on their second call and replayed from then on (`cuda_graphs=False` turns it off;
a failed capture falls back to plain execution with a warning). Without a GPU the constructor fails at once.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from .engine_factory import require_cuda_device
from .graph_engine import SHARED_INPUTS, SHARED_OUTPUTS, GraphCall, GraphEngine, check_io
from .policy_folder import PolicyFolderError, PolicySpec, TensorSpec

log = logging.getLogger(__name__)


class _TrtGraph(GraphCall):
    def __init__(self, owner: 'TrtEngine', key: str):
        from .cuda_memory import DeviceArray

        trt = owner.trt
        gspec = owner.spec.graphs[key]
        where = str(owner.spec.path(key))
        self.key = key
        self.engine = owner.store.load_or_build(key)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f'TensorRT could not create an execution context for {where} (GPU memory?)')
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        specs = {t.name: t for t in gspec.inputs + gspec.outputs}
        if sorted(names) != sorted(specs):
            raise PolicyFolderError(f'{where}: engine tensors {names} differ from policy.yaml {sorted(specs)}')
        self.buffers, self.mirrors = {}, {}
        for name in names:
            t = specs[name]
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            check_io(t, tuple(self.engine.get_tensor_shape(name)), trt.nptype(self.engine.get_tensor_dtype(name)),
                     where)
            shared = name in (SHARED_INPUTS if is_input else SHARED_OUTPUTS) and name != 'kv_valid'
            buf = owner.shared_buffer(t) if shared else DeviceArray(t.shape, np.dtype(t.dtype))
            self.buffers[name] = buf
            if not self.context.set_tensor_address(name, buf.ptr):
                raise RuntimeError(f'{where}: set_tensor_address failed for {name}')
        self.use_graph = owner.cuda_graphs and gspec.step_width is not None
        self.graph_exec = None
        self.runs = 0

    def feed(self, name, array):
        self.buffers[name].copy_from_host(array, sync=False)  # ordered on the engine's stream

    def run(self):
        from .cuda_memory import check, cudart, stream

        if self.use_graph and self.graph_exec is None and self.runs >= 1:
            self._capture()
        if self.graph_exec is not None:
            check(cudart().cudaGraphLaunch(self.graph_exec, stream()))
        elif not self.context.execute_async_v3(int(stream())):
            raise RuntimeError(f'TensorRT execute_async_v3 failed for graph {self.key}')
        self.runs += 1

    def _capture(self):
        """Record one execution into a CUDA graph (not executed now; `run` launches it)."""
        from .cuda_memory import check, cudart, stream

        rt, s = cudart(), stream()
        try:
            check(rt.cudaStreamBeginCapture(s, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
            try:
                ok = self.context.execute_async_v3(int(s))
            finally:
                graph = check(rt.cudaStreamEndCapture(s))
            if not ok:
                raise RuntimeError('execute_async_v3 failed while capturing')
            self.graph_exec = check(rt.cudaGraphInstantiate(graph, 0))
            check(rt.cudaGraphDestroy(graph))
            log.info('TensorRT graph %s runs as a CUDA graph', self.key)
        except Exception as e:  # noqa: BLE001 - capture is an optimization
            log.warning('CUDA graph capture failed for %s (%s); running it without CUDA graphs', self.key, e)
            self.use_graph, self.graph_exec = False, None

    def host(self, name):
        buf = self.buffers[name]
        out = self.mirrors.get(name)
        if out is None:
            out = self.mirrors[name] = np.empty(buf.shape, buf.dtype)
        return buf.copy_to_host(out)  # synchronizes the stream

    def buffer(self, name):
        return self.buffers[name]


class TrtEngine(GraphEngine):
    name = 'tensorrt'

    def __init__(self, spec: PolicySpec, fp16: bool = False, cache_dir: Optional[str] = None,
                 cuda_graphs: bool = True, reuse_text_kv: bool = True, device_id: int = 0):
        require_cuda_device("engine 'tensorrt'")  # fails at once, naming the ONNX Runtime alternative
        from .cuda_memory import check, cudart, device_identity
        from .tensorrt_build import EngineStore, import_tensorrt

        self.trt = import_tensorrt()
        check(cudart().cudaSetDevice(int(device_id)))
        self.device_id = int(device_id)
        self.fp16 = bool(fp16)
        self.cuda_graphs = bool(cuda_graphs)
        self.gpu = device_identity(self.device_id)
        self.store = EngineStore(self.trt, spec, self.gpu, fp16=self.fp16, cache_dir=cache_dir)
        super().__init__(spec, reuse_text_kv=reuse_text_kv)

    def _alloc(self, shape):
        from .cuda_memory import DeviceArray

        return DeviceArray(shape, np.float32)

    def _new_buffer(self, t: TensorSpec):
        from .cuda_memory import DeviceArray

        return DeviceArray(t.shape, np.dtype(t.dtype))

    def _open(self, key):
        return _TrtGraph(self, key)

    def describe(self) -> dict:
        return {'engine': self.name, 'provider': f'TensorRT {self.trt.__version__}',
                'device': f'cuda:{self.device_id} ({self.gpu["name"]}, sm {self.gpu["compute_capability"]})',
                'precision': 'fp16' if self.fp16 else 'fp32', 'cuda_graphs': self.cuda_graphs,
                'engine_cache': str(self.store.cache_dir), 'reuse_text_kv': self.reuse_text_kv}
