"""CUDA device buffers for the GPU engines through cuda-python (no torch), plus a driver-level GPU probe.

`DeviceArray` supports exactly what the KV cache needs: `buf[:, :, :, a:b] = other[:, :, :, :c]` along the slot
axis of [layers, 2, kv_heads, T, head_dim] arrays (one strided 2-D copy), host <-> device copies and a zero fill.
All work goes to one process-wide stream and is synchronized before returning, so it orders correctly with
TensorRT (same stream) and with ONNX Runtime's CUDA provider (which synchronizes at the end of every run).
"""
from __future__ import annotations

import ctypes
import logging
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

_STREAM = None


def cuda_device_count() -> tuple[int, str]:
    """(number of CUDA devices, reason when 0), via the driver library only: needs no Python package."""
    try:
        lib = ctypes.CDLL('libcuda.so.1')
    except OSError as e:
        return 0, f'no NVIDIA driver: libcuda.so.1 cannot be loaded ({e})'
    if lib.cuInit(0) != 0:
        return 0, 'the NVIDIA driver is present but cuInit failed (no usable GPU)'
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, 'the NVIDIA driver reports no CUDA device'
    return count.value, ''


def cudart():
    """The cuda-python runtime module (new and old import paths)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt
        except ImportError as e:
            raise ImportError('the GPU engines need the cuda-python package: pip install cuda-python') from e
    return rt


def check(result):
    """cuda-python calls return (error, *values): raise on an error, return the value(s)."""
    err, values = result[0], result[1:]
    if int(err) != 0:
        rt = cudart()
        try:
            text = rt.cudaGetErrorString(err)[1]
            text = text.decode() if isinstance(text, bytes) else str(text)
        except Exception:  # noqa: BLE001 - the message is best effort
            text = ''
        raise RuntimeError(f'CUDA error {err!r}: {text}')
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def stream():
    global _STREAM
    if _STREAM is None:
        _STREAM = check(cudart().cudaStreamCreate())
    return _STREAM


def synchronize() -> None:
    check(cudart().cudaStreamSynchronize(stream()))


def device_identity(device: int = 0) -> dict:
    """GPU name and compute capability (keys the TensorRT engine cache)."""
    rt = cudart()
    props = check(rt.cudaGetDeviceProperties(device))
    name = props.name
    name = name.decode(errors='replace').rstrip('\x00') if isinstance(name, (bytes, bytearray)) else str(name)
    return {'name': name, 'compute_capability': f'{props.major}.{props.minor}'}


class DeviceArray:
    """A device buffer of fixed shape/dtype (owned via cudaMalloc, or a view of memory owned by `owner`)."""

    def __init__(self, shape, dtype, ptr: Optional[int] = None, owner=None):
        self.ptr, self._owned = 0, False
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._owner = owner  # keeps e.g. an OrtValue alive
        self._owned = ptr is None
        self.ptr = int(check(cudart().cudaMalloc(max(self.nbytes, 1)))) if ptr is None else int(ptr)
        if self._owned:
            self.zero()

    def zero(self) -> None:
        check(cudart().cudaMemsetAsync(self.ptr, 0, self.nbytes, stream()))
        synchronize()

    def copy_from_host(self, array: np.ndarray, sync: bool = True) -> None:
        a = np.ascontiguousarray(array, dtype=self.dtype)
        if a.shape != self.shape:
            raise ValueError(f'host array {a.shape} does not fit device buffer {self.shape}')
        rt = cudart()
        check(rt.cudaMemcpyAsync(self.ptr, a.ctypes.data, self.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                 stream()))
        if sync:
            synchronize()

    def copy_to_host(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype) if out is None else out
        rt = cudart()
        check(rt.cudaMemcpyAsync(out.ctypes.data, self.ptr, self.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                 stream()))
        synchronize()
        return out

    def _slots(self, key) -> tuple:
        if not (isinstance(key, tuple) and len(key) == 4 and all(k == slice(None) for k in key[:3])
                and isinstance(key[3], slice) and key[3].step in (None, 1) and len(self.shape) == 5):
            raise TypeError(f'DeviceArray supports only buf[:, :, :, a:b] on 5-D buffers, got {key!r}')
        start, stop, _ = key[3].indices(self.shape[3])
        return start, stop

    def __getitem__(self, key) -> 'SlotView':
        """buf[:, :, :, a:b]: a strided view along the slot axis (only for copying into another buffer)."""
        start, stop = self._slots(key)
        return SlotView(self, start, stop - start)

    def __setitem__(self, key, value) -> None:
        """buf[:, :, :, a:b] = value: value [d0, d1, d2, b - a, d4] (DeviceArray, SlotView or host array)."""
        start, stop = self._slots(key)
        n = stop - start
        want = self.shape[:3] + (n, self.shape[4])
        if tuple(value.shape) != want:
            raise ValueError(f'slot copy: value {tuple(value.shape)} does not fit {want}')
        if n == 0:
            return
        rt = cudart()
        item = self.dtype.itemsize
        rows = self.shape[0] * self.shape[1] * self.shape[2]  # [d0, d1, d2, T, d4] -> rows of T * d4
        width = n * self.shape[4] * item
        dst = self.ptr + start * self.shape[4] * item
        dpitch = self.shape[3] * self.shape[4] * item
        spitch = width
        if isinstance(value, SlotView):
            src, kind = value.ptr, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            spitch = value.pitch
        elif isinstance(value, DeviceArray):
            src, kind = value.ptr, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        else:
            host = np.ascontiguousarray(value, dtype=self.dtype)
            src, kind = host.ctypes.data, rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, kind, stream()))
        synchronize()

    def free(self) -> None:
        if getattr(self, '_owned', False) and self.ptr:
            try:
                check(cudart().cudaFree(self.ptr))
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass
        self.ptr = 0

    def __del__(self):
        self.free()


class SlotView:
    """Slots [start, start + count) of a 5-D DeviceArray: rows of `count * d4` elements, `pitch` bytes apart."""

    def __init__(self, base: DeviceArray, start: int, count: int):
        item = base.dtype.itemsize
        self.shape = base.shape[:3] + (count, base.shape[4])
        self.ptr = base.ptr + start * base.shape[4] * item
        self.pitch = base.shape[3] * base.shape[4] * item
        self._base = base
