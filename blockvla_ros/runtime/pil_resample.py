"""Pillow's `Image.resize` on uint8 RGB, reimplemented in numpy bit for bit (no PIL at run time).

The HF image processors of PaliGemma, Idefics3/SmolVLM and Qwen2-VL resize with Pillow (their PIL backend), so a
policy that must see exactly the pixels its VLM was pretrained on needs Pillow's arithmetic, not OpenCV's. Pillow
(`libImaging/Resample.c`) resizes in two separable passes, horizontal first, each on 8-bit data:

    coefficients  per output pixel: filter((x + xmin - center + 0.5) / filterscale) over the input pixels whose
                  centres lie within `support * filterscale` of the output centre; normalised to sum 1; then
                  fixed point with PRECISION_BITS = 22 (rounded half away from zero)
    one pass      out = clip((sum_k in[xmin + k] * coeff[k] + 2^21) >> 22, 0, 255)   (integer arithmetic)

A pass is skipped when that dimension keeps its size. Pillow >= 13 runs the vertical pass first when the height
shrinks by more than twice as many pixels as the width (`(H_in - H) > 2 (W_in - W)`); older Pillow always ran the
horizontal pass first (the two orders differ in the rounding between passes). Coefficients are computed with Python
floats and `math` (the same IEEE doubles and libm as Pillow's C code) and cached per (input size, output size,
filter).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

PRECISION_BITS = 32 - 8 - 2

# PIL.Image.Resampling values (the integers HF processor configs store under "resample")
NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 0, 1, 2, 3, 4, 5
FILTER_NAMES = {LANCZOS: 'lanczos', BILINEAR: 'bilinear', BICUBIC: 'bicubic', BOX: 'box', HAMMING: 'hamming'}


_F054, _F046 = float(np.float32(0.54)), float(np.float32(0.46))  # Pillow writes 0.54f / 0.46f (C floats)


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x: float) -> float:
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0


def _hamming(x: float) -> float:
    x = -x if x < 0.0 else x
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_F054 + _F046 * math.cos(x))


def _bicubic(x: float) -> float:
    a = -0.5
    x = -x if x < 0.0 else x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


_FILTERS = {BOX: (_box, 0.5), BILINEAR: (_bilinear, 1.0), HAMMING: (_hamming, 1.0), BICUBIC: (_bicubic, 2.0),
            LANCZOS: (_lanczos, 3.0)}


@lru_cache(maxsize=64)
def coefficients(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (index int64 [out_size, ksize] into the input line, fixed-point weights int32 [out_size, ksize]).

    Taps beyond an output pixel's window get weight 0 and index 0 (Pillow's zero-filled tail)."""
    if resample not in _FILTERS:
        raise ValueError(f'resample {resample} is not supported (supported: '
                         f'{ {k: v for k, v in FILTER_NAMES.items()} })')
    fn, filter_support = _FILTERS[resample]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, ksize), dtype=np.int64)
    weight = np.zeros((out_size, ksize), dtype=np.int32)
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int(): truncation toward zero, as the C cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = [fn((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for w in ws:
            ww += w
        for x, w in enumerate(ws):
            w = w / ww if ww != 0.0 else w
            weight[xx, x] = int(-0.5 + w * (1 << PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << PRECISION_BITS))
            index[xx, x] = xmin + x
    return index, weight


def _pass(image: np.ndarray, out_size: int, axis: int, resample: int) -> np.ndarray:
    """One 8-bit pass along `axis` (0 = rows/height, 1 = columns/width) of uint8 [H, W, C].

    int32 accumulation, as Pillow's C code (its `int ss`)."""
    index, weight = coefficients(image.shape[axis], out_size, resample)
    src = image.astype(np.int32)
    out_shape = src.shape[:axis] + (out_size,) + src.shape[axis + 1:]
    acc = np.full(out_shape, 1 << (PRECISION_BITS - 1), dtype=np.int32)
    tmp = np.empty(out_shape, dtype=np.int32)
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    for k in range(index.shape[1]):  # ksize taps, each vectorised over the whole image
        np.take(src, index[:, k], axis=axis, out=tmp)  # [.., out_size, ..]
        tmp *= weight[:, k].reshape(shape)
        acc += tmp
    acc >>= PRECISION_BITS
    return np.clip(acc, 0, 255).astype(np.uint8)


def resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [height, width, C], equal to `np.array(PIL.Image.fromarray(image).resize((width,
    height), resample))`."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f'resize expects uint8 [H, W, C], got {img.dtype} {img.shape}')
    if height <= 0 or width <= 0:
        raise ValueError(f'resize target must be positive, got {height} x {width}')
    if resample == NEAREST:
        raise ValueError('resample NEAREST is not supported by the numpy resize (no VLM family uses it)')
    shrink_h, shrink_w = img.shape[0] - height, img.shape[1] - width
    vertical_first = shrink_h > 0 and shrink_h > 2 * shrink_w
    out = img
    for axis in ((0, 1) if vertical_first else (1, 0)):
        size = (height, width)[axis]
        if size != img.shape[axis]:
            out = _pass(out, size, axis, resample)
    return out if out is not img else img.copy()
