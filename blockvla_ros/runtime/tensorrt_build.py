"""TensorRT engines from the policy folder's ONNX graphs (the same files ONNX Runtime runs), built once per GPU and
cached on disk: one engine per graph; the backbone's carries the optimization profiles of runtime.tensorrt_profiles.

Cache key = sha256 over (TensorRT version, GPU name, compute capability, the graph's ONNX sha256 from the
verified manifest, precision); an engine from another TensorRT or GPU is therefore never loaded. The cache
lives outside the policy folder (default ~/.cache/blockvla_ros/tensorrt, or $BLOCKVLA_TRT_CACHE), so the
folder's manifest stays valid. A build is announced with a log line and shows tqdm progress per phase.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from ..io.atomic import atomic_write_bytes
from .policy_folder import PolicySpec
from .tensorrt_profiles import check_profiles, profile_shapes

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: policy folder format 2 (one backbone engine with token-count profiles)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError("engine 'tensorrt' needs TensorRT 10 for Python: pip install tensorrt-cu12 (x86_64, "
                          "from NVIDIA's index) or the python3-libnvinfer package of JetPack; or use engine "
                          "'onnxruntime'") from e
    if int(trt.__version__.split('.')[0]) < 10:
        raise ImportError(f"engine 'tensorrt' needs TensorRT >= 10 (execute_async_v3 / set_tensor_address), found "
                          f'{trt.__version__}')
    return trt


def default_cache_dir() -> Path:
    env = os.environ.get('BLOCKVLA_TRT_CACHE')
    if env:
        return Path(env).expanduser()
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'blockvla_ros' / 'tensorrt'


def _progress_monitor(trt, label: str):
    """A trt.IProgressMonitor drawing one tqdm bar per build phase."""
    from tqdm import tqdm

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = 0 if parent_phase is None else 1 + getattr(self.bars.get(parent_phase), 'pos', 0)
            bar = tqdm(total=num_steps, desc=f'{label}: {phase_name}', position=depth, leave=parent_phase is None)
            bar.pos = depth
            self.bars[phase_name] = bar

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # keep building

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Monitor()


class EngineStore:
    """Loads (or builds and caches) the TensorRT engine of each graph of one policy folder."""

    def __init__(self, trt, spec: PolicySpec, gpu: dict, fp16: bool = False, cache_dir: Optional[str] = None):
        self.trt = trt
        self.spec = spec
        self.gpu = gpu
        self.precision = 'fp16' if fp16 else 'fp32'
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)

    def profiles(self, key: str) -> list:
        """The optimization profiles of graph `key` (none for static graphs)."""
        return check_profiles(self.spec) if key == 'backbone' else []

    def cache_key(self, key: str) -> str:
        ident = {'format': CACHE_FORMAT, 'tensorrt': self.trt.__version__, 'gpu': self.gpu['name'],
                 'compute_capability': self.gpu['compute_capability'], 'onnx_sha256': self.spec.graph_sha256(key),
                 'precision': self.precision, 'profiles': [repr(p) for p in self.profiles(key)]}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def engine_path(self, key: str) -> Path:
        return self.cache_dir / f'{self.spec.name}-{key}-{self.precision}-{self.cache_key(key)[:20]}.engine'

    def load_or_build(self, key: str):
        path = self.engine_path(key)
        if path.is_file():
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is not None:
                log.info('TensorRT engine for %s loaded from cache %s', key, path)
                return engine
            log.warning('cached TensorRT engine %s could not be deserialized; rebuilding it', path)
        blob = self.build(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, blob)
        engine = self.runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise RuntimeError(f'TensorRT could not deserialize the engine it just built for {key} ({path})')
        return engine

    def build(self, key: str) -> bytes:
        trt = self.trt
        onnx_path = self.spec.path(key)
        log.warning('Building TensorRT %s engine for %s (%s) on %s (sm %s), TensorRT %s: the first build on this '
                    'GPU can take minutes; it is cached in %s', self.precision, key, onnx_path.name, self.gpu['name'],
                    self.gpu['compute_capability'], trt.__version__, self.cache_dir)
        t = time.perf_counter()
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):  # resolves .onnx.data sidecars next to the file
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeError(f'TensorRT cannot parse {onnx_path}: {errors[:5]}')
        config = builder.create_builder_config()
        if self.precision == 'fp16':
            config.set_flag(trt.BuilderFlag.FP16)
        for p in self.profiles(key):
            profile = builder.create_optimization_profile()
            shapes = profile_shapes(self.spec.graphs[key], p, self.spec.config.max_seq_len)
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        config.progress_monitor = _progress_monitor(trt, f'TensorRT {key}')
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f'TensorRT failed to build an engine for {onnx_path} (see the TensorRT log above)')
        log.warning('TensorRT engine for %s built in %.1f s', key, time.perf_counter() - t)
        return bytes(memoryview(serialized))
