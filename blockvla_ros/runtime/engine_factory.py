"""Engine names -> engines over a verified policy folder; the GPU check that fails fast without a GPU.

    onnxruntime        ONNX Runtime on the CPU (the embedded default; never imports torch)
    onnxruntime-cuda   ONNX Runtime with the CUDA provider (falls back to the CPU unless require_gpu)
    tensorrt           TensorRT engines built from the ONNX graphs and cached (NVIDIA GPU only)
    torch              the torch modules, from model.safetensors in the folder (runtime.torch_static_engine: static
                       buffers; on a GPU CUDA graphs and bf16 / fp16 weights)
"""
from __future__ import annotations

import logging
from typing import Optional

from .policy_folder import PolicyFolderError, PolicySpec

log = logging.getLogger(__name__)

ENGINES = ('onnxruntime', 'onnxruntime-cuda', 'tensorrt', 'torch')


class GPUUnavailableError(RuntimeError):
    """A GPU engine was requested but no usable NVIDIA GPU (or GPU provider) is available."""


def require_cuda_device(what: str) -> int:
    """Fail at once, naming the CPU alternative, when no CUDA device is present. -> device count."""
    from .cuda_memory import cuda_device_count

    count, reason = cuda_device_count()
    if count == 0:
        raise GPUUnavailableError(f'{what} needs an NVIDIA GPU with CUDA, and this machine has none ({reason}). '
                                  "Use engine 'onnxruntime' (ONNX Runtime on the CPU) instead, e.g. "
                                  "PolicyRunner.load(folder, engine='onnxruntime') or the node parameter "
                                  'engine:=onnxruntime.')
    return count


def create_engine(spec: PolicySpec, engine: str = 'onnxruntime', *, require_gpu: bool = False,
                  threads: Optional[int] = None, options: Optional[dict] = None):
    """Build the named engine. `options`: reuse_text_kv (every engine), fp16, cache_dir, cuda_graphs, device_id
    (tensorrt), device ('cpu' | 'cuda' | 'cuda:N'), dtype ('float32' | 'bfloat16' | 'float16'), cuda_graphs (torch)."""
    options = dict(options or {})
    if engine not in ENGINES:
        raise ValueError(f'unknown engine {engine!r}; expected one of {ENGINES}')
    if engine == 'tensorrt':
        require_cuda_device("engine 'tensorrt'")
        from .trt_engine import TrtEngine

        return TrtEngine(spec, **_take(options, ('fp16', 'cache_dir', 'cuda_graphs', 'reuse_text_kv', 'device_id')))
    if engine in ('onnxruntime', 'onnxruntime-cuda'):
        from .ort_engine import OrtEngine

        device = 'cuda' if engine == 'onnxruntime-cuda' else 'cpu'
        if device == 'cuda' and require_gpu:
            require_cuda_device("engine 'onnxruntime-cuda' with require_gpu")
        return OrtEngine(spec, device=device, threads=threads, require_gpu=require_gpu,
                         **_take(options, ('reuse_text_kv',)))
    # torch: the reference engine from the exported safetensors (no pickle)
    if not spec.weights:
        raise PolicyFolderError(f"{spec.folder}: engine 'torch' needs model.safetensors in the policy folder "
                                "(export without --no-torch-weights), or use engine 'onnxruntime'")
    import torch

    from ..model.policy import BlockVLAPolicy
    from .torch_static_engine import StaticTorchEngine, torch_dtype

    options = _take(options, ('device', 'dtype', 'cuda_graphs', 'reuse_text_kv'))
    device = str(options.get('device', 'cuda' if require_gpu else 'cpu'))
    torch_dtype(options.get('dtype', 'float32'))  # a bad name fails before the weights load
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise GPUUnavailableError("engine 'torch' on cuda needs a CUDA build of torch and a GPU; use engine "
                                  "'onnxruntime' for the CPU")
    if threads:
        torch.set_num_threads(int(threads))
    return StaticTorchEngine(BlockVLAPolicy.load(spec.folder, config=spec.config), device=device,
                             dtype=options.get('dtype', 'float32'), cuda_graphs=options.get('cuda_graphs', True),
                             reuse_instruction=options.get('reuse_text_kv', True))


def _take(options: dict, allowed: tuple) -> dict:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f'unknown engine options {unknown}; this engine accepts {list(allowed)}')
    return options
