"""sensor_msgs/Image and CompressedImage <-> numpy, without cv_bridge or ROS.

Duck-typed on message fields, so the same functions take rclpy messages (``data`` is an
``array.array('B')``) and rosbags-deserialized messages (``data`` is a numpy uint8 array).

Decoding always honours ``step`` (row padding) and ``is_bigendian``; the policy consumes
HxWx3 uint8 RGB, produced by :func:`message_to_rgb8` (or :func:`to_rgb8`).

16-bit and float images are mapped to 8 bits by one fixed linear rule (never per-frame min/max,
so the mapping is identical for every frame): ``out = clip(round(v * 255 / value_max), 0, 255)``
with ``value_max`` = 65535 for 16-bit (the full range, like ``v >> 8``) and 1.0 for 32FC1
(depth in metres up to 1 m). Pass ``value_max`` (e.g. 2000 for 16UC1 depth in mm up to 2 m) to
spread a smaller range over the 8-bit scale. NaN and inf map to 0.

Bounded decoding (images come from topics and bags: untrusted): raw images are size-checked before
any copy; compressed images must be PNG or JPEG, whose header gives the dimensions that are checked
against ``max_pixels`` before any pixel is allocated. As a second line, OpenCV's own decoder limit
(``OPENCV_IO_MAX_IMAGE_PIXELS``) is set to DECODER_MAX_PIXELS unless the environment sets it.
Every failure is an :class:`ImageConversionError`.
"""
from __future__ import annotations

import os
import sys
from typing import Any

DECODER_MAX_PIXELS = 1 << 26
"""OpenCV's own limit (64 MP), read once at its first decode: a backstop behind the header check."""
os.environ.setdefault('OPENCV_IO_MAX_IMAGE_PIXELS', str(DECODER_MAX_PIXELS))

import cv2  # noqa: E402  (after the limit above, which OpenCV reads at its first decode)
import numpy as np  # noqa: E402

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest accepted height*width (16.7 MP): bigger images are refused before any copy or decode."""

# encoding -> (dtype, channels). Channel order stays as encoded in image_to_numpy's output.
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    'rgb8': (np.dtype(np.uint8), 3),
    'bgr8': (np.dtype(np.uint8), 3),
    'rgba8': (np.dtype(np.uint8), 4),
    'bgra8': (np.dtype(np.uint8), 4),
    'mono8': (np.dtype(np.uint8), 1),
    '8UC1': (np.dtype(np.uint8), 1),
    'mono16': (np.dtype(np.uint16), 1),
    '16UC1': (np.dtype(np.uint16), 1),
    '32FC1': (np.dtype(np.float32), 1),
}
WRITE_ENCODINGS = ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8')
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class ImageConversionError(ValueError):
    """An image message (or array) that cannot be converted; the message names the problem."""


def _bytes_view(data: Any) -> np.ndarray:
    """The message's ``data`` field as a flat uint8 array, without a copy where possible."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ImageConversionError(f'image data must be uint8 bytes, got dtype {data.dtype}')
        return data.reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)  # bytes, bytearray, array.array('B'), memoryview
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)  # a plain list of ints


def _check_size(height: int, width: int, max_pixels: int, what: str) -> None:
    if height <= 0 or width <= 0:
        raise ImageConversionError(f'{what} has zero size ({width}x{height})')
    if height * width > max_pixels:
        raise ImageConversionError(
            f'{what} is too large: {width}x{height} = {height * width} pixels > limit {max_pixels}')


def image_to_numpy(msg: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a sensor_msgs/Image to HxW (one channel) or HxWxC in native byte order.

    Channel order is the encoding's (bgr8 stays BGR); use :func:`to_rgb8` for the policy.
    The result may share memory with ``msg.data``; copy it if you modify it.
    """
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise ImageConversionError(
            f'unknown image encoding {encoding!r}; supported: {", ".join(ENCODINGS)}')
    dtype, channels = ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    _check_size(height, width, max_pixels, f'{encoding} image')
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageConversionError(
            f'image step {step} is smaller than width*bytes_per_pixel = {width}*'
            f'{channels * dtype.itemsize} = {row_bytes} ({encoding} {width}x{height})')
    data = _bytes_view(msg.data)
    if data.size < height * step:
        raise ImageConversionError(
            f'image data has {data.size} bytes, expected height*step = {height}*{step} = '
            f'{height * step} ({encoding} {width}x{height})')
    rows = data[:height * step].reshape(height, step)[:, :row_bytes]  # [H, step] -> [H, W*C*itemsize]
    if dtype.itemsize > 1:
        big = bool(msg.is_bigendian)
        wire = dtype.newbyteorder('>' if big else '<')
        if not rows.flags.c_contiguous:
            rows = np.ascontiguousarray(rows)
        pixels = rows.view(wire)  # [H, W*C] in the wire byte order
        if big != (sys.byteorder == 'big'):
            pixels = pixels.astype(dtype)  # byte-swapped copy in native order
    else:
        pixels = rows
    if channels == 1:
        return pixels.reshape(height, width)  # [H, W*1] -> [H, W]
    return pixels.reshape(height, width, channels)  # [H, W*C] -> [H, W, C]


MAX_JPEG_SCANS = 100  # a camera's progressive JPEG has ~10; thousands of tiny scans make decoding take seconds
_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}  # IHDR colour type -> channels (palette: up to RGBA)


def _png_header(data: bytes) -> tuple[int, int, int]:
    """(width, height, channels) from the IHDR chunk, which PNG requires first (libpng refuses anything else)."""
    if len(data) < 33 or data[8:16] != b'\x00\x00\x00\rIHDR':
        raise ImageConversionError('PNG data does not start with an IHDR chunk')
    width, height = int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
    depth, colour = data[24], data[25]
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise ImageConversionError(f'PNG colour type {colour} / bit depth {depth} is not valid')
    return width, height, _PNG_CHANNELS[colour]


def _jpeg_header(data: bytes) -> tuple[int, int, int]:
    """(width, height, components) from the first SOF marker, walking the markers the way libjpeg does.

    libjpeg skips junk bytes between markers (a byte after APP0 hid the SOF from a strict parser, and a
    30000x30000 frame decoded unchecked), so this walk skips them too; a header where no SOF comes before the
    scan data, a second SOI, or a frame with a component count OpenCV cannot output is refused.
    """
    i, n = 2, len(data)
    while True:
        i = data.find(b'\xff', i)  # libjpeg's next_marker: skip anything up to a 0xFF
        while 0 <= i < n and data[i] == 0xFF:
            i += 1  # fill bytes
        if i < 0 or i >= n:
            raise ImageConversionError('JPEG data ends before a frame header (SOF marker)')
        marker = data[i]
        i += 1
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # a stuffed zero (junk), TEM or RSTn: no length
        if marker in (0xD8, 0xD9, 0xDA):
            raise ImageConversionError(f'JPEG marker 0x{marker:02X} before the frame header (SOF)')
        if i + 2 > n:
            raise ImageConversionError('JPEG data ends inside a marker segment')
        length = int.from_bytes(data[i:i + 2], 'big')
        if length < 2:
            raise ImageConversionError(f'JPEG marker 0x{marker:02X} has an invalid length {length}')
        if marker in _JPEG_SOF:
            if i + 8 > n:
                raise ImageConversionError('JPEG data ends inside the frame header')
            precision, components = data[i + 2], data[i + 7]
            if precision not in (8, 12) or components not in (1, 3, 4):
                raise ImageConversionError(f'JPEG frame with {precision}-bit samples and {components} components '
                                           'is not supported (8/12-bit; 1, 3 or 4 components)')
            scans = data.count(b'\xff\xda')  # SOS markers (0xFF in entropy data is always stuffed as FF 00)
            if scans > MAX_JPEG_SCANS:
                raise ImageConversionError(f'JPEG with {scans} scans (limit {MAX_JPEG_SCANS}): each progressive '
                                           'scan is another pass over the whole frame')
            return int.from_bytes(data[i + 5:i + 7], 'big'), int.from_bytes(data[i + 3:i + 5], 'big'), components
        i += length


def compressed_header(data: bytes) -> tuple[str, int, int, int]:
    """('png' | 'jpeg', width, height, channels) read from the header, before any pixel is allocated.

    These are the only compressed formats accepted: anything else OpenCV could decode (BMP with RLE, TIFF, WebP,
    GIF, PNM, HDR, JPEG 2000...) is refused here, so every decode has known, checked dimensions.
    """
    if data[:8] == _PNG_SIGNATURE:
        return ('png', *_png_header(data))
    if data[:3] == b'\xff\xd8\xff':
        return ('jpeg', *_jpeg_header(data))
    raise ImageConversionError(f'compressed image data is neither PNG nor JPEG (starts with {data[:8]!r}); only '
                               'PNG and JPEG are accepted')


def compressed_to_numpy(msg: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (JPEG or PNG only) with OpenCV, IMREAD_UNCHANGED.

    The dimensions are read from the header first (:func:`compressed_header`) and checked against
    ``max_pixels`` before OpenCV allocates anything; any other format is refused.

    Colour comes back RGB (or RGBA), mono as HxW, 16-bit PNG stays uint16. The format string's
    "compressed <enc>" part says how the bytes were encoded: bgr8 (the image_transport and
    cv2.imencode convention, swapped here) unless it names rgb8/rgba8. "16UC1; compressedDepth"
    (a 12-byte header before the PNG) is supported; 32FC1 compressedDepth is not.
    """
    fmt = str(getattr(msg, 'format', '') or '')
    buf = _bytes_view(msg.data)
    if buf.size == 0:
        raise ImageConversionError(f'compressed image (format {fmt!r}) has no data')
    if 'compresseddepth' in fmt.lower():
        if fmt.strip().lower().startswith('32fc1'):
            raise ImageConversionError(f'compressed image format {fmt!r} is not supported '
                                       '(32FC1 compressedDepth needs its quantization header)')
        start = buf.tobytes().find(_PNG_SIGNATURE)
        if start < 0:
            raise ImageConversionError(f'compressedDepth image (format {fmt!r}) holds no PNG data')
        buf = buf[start:]
    kind, width, height, _ = compressed_header(buf.tobytes())
    _check_size(height, width, max_pixels, f'compressed image ({kind}, format {fmt!r})')
    try:
        decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as err:  # OpenCV builds that raise instead of returning None
        raise ImageConversionError(f'compressed {kind} image (format {fmt!r}, {buf.size} bytes) could not be '
                                   f'decoded: {str(err).strip()[:200]}') from None
    if decoded is None or decoded.size == 0:
        raise ImageConversionError(
            f'compressed image (format {fmt!r}, {buf.size} bytes) could not be decoded')
    if decoded.shape[:2] != (height, width):  # the header walk and the decoder disagree: trust neither
        raise ImageConversionError(f'compressed {kind} image (format {fmt!r}) decoded to {decoded.shape[1]}x'
                                   f'{decoded.shape[0]}, its header says {width}x{height}')
    if decoded.ndim == 3 and decoded.shape[2] == 1:
        decoded = decoded[:, :, 0]  # [H, W, 1] -> [H, W]
    if decoded.ndim == 3:
        source = fmt.split('compressed', 1)[1].strip().lower() if 'compressed' in fmt else 'bgr8'
        if not source.startswith('rgb'):
            code = cv2.COLOR_BGR2RGB if decoded.shape[2] == 3 else cv2.COLOR_BGRA2RGBA
            decoded = cv2.cvtColor(decoded, code)
    return decoded


def _encoding_of_decoded(array: np.ndarray) -> str:
    """The encoding that describes an array returned by :func:`compressed_to_numpy`."""
    channels = 1 if array.ndim == 2 else array.shape[2]
    if array.dtype == np.uint16 and channels == 1:
        return 'mono16'
    if array.dtype == np.uint8 and channels in (1, 3, 4):
        return {1: 'mono8', 3: 'rgb8', 4: 'rgba8'}[channels]
    raise ImageConversionError(
        f'decoded compressed image has an unsupported layout: dtype {array.dtype}, {channels} channels')


def _scale_to_uint8(array: np.ndarray, value_max: float) -> np.ndarray:
    """The documented linear 16-bit/float -> 8-bit rule (see the module docstring)."""
    if not value_max > 0:
        raise ImageConversionError(f'value_max must be > 0, got {value_max}')
    values = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(np.rint(values * (255.0 / value_max)), 0, 255).astype(np.uint8)


def to_rgb8(array: np.ndarray, encoding: str, *, value_max: float | None = None) -> np.ndarray:
    """Convert an array laid out as ``encoding`` to a new HxWx3 uint8 RGB array.

    mono is replicated to three channels, alpha dropped, BGR swapped; 16-bit and 32FC1 go
    through the linear rule of the module docstring (``value_max`` overrides its default).
    """
    if encoding not in ENCODINGS:
        raise ImageConversionError(
            f'unknown image encoding {encoding!r}; supported: {", ".join(ENCODINGS)}')
    dtype, channels = ENCODINGS[encoding]
    array = np.asarray(array)
    expected_ndim = 2 if channels == 1 else 3
    if array.ndim != expected_ndim or (channels > 1 and array.shape[2] != channels):
        raise ImageConversionError(
            f'array of shape {array.shape} does not match encoding {encoding!r} ({channels} channels)')
    if array.dtype != dtype:
        raise ImageConversionError(f'array dtype {array.dtype} does not match encoding {encoding!r} ({dtype})')
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageConversionError(f'image has zero size ({array.shape[1]}x{array.shape[0]})')
    if dtype != np.uint8:
        default = 65535.0 if dtype == np.uint16 else 1.0
        array = _scale_to_uint8(array, default if value_max is None else float(value_max))
    if channels == 1:
        return np.ascontiguousarray(np.repeat(array[:, :, None], 3, axis=2))  # [H, W] -> [H, W, 3]
    if encoding.startswith('bgr'):
        return np.ascontiguousarray(array[:, :, 2::-1])  # BGR(A) -> RGB, alpha dropped
    return np.ascontiguousarray(array[:, :, :3])  # RGB(A) -> RGB


def is_compressed_message(msg: Any) -> bool:
    """True for a CompressedImage-like message (``format`` + ``data``, no ``encoding``)."""
    return hasattr(msg, 'format') and not hasattr(msg, 'encoding')


def message_to_rgb8(msg: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                    value_max: float | None = None) -> np.ndarray:
    """Image or CompressedImage message -> new HxWx3 uint8 RGB array for the policy."""
    if is_compressed_message(msg):
        array = compressed_to_numpy(msg, max_pixels=max_pixels)
        return to_rgb8(array, _encoding_of_decoded(array), value_max=value_max)
    array = image_to_numpy(msg, max_pixels=max_pixels)
    return to_rgb8(array, str(msg.encoding), value_max=value_max)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageConversionError(f'expected an HxWx3 uint8 RGB array, got shape {rgb.shape} dtype {rgb.dtype}')
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageConversionError(f'image has zero size ({rgb.shape[1]}x{rgb.shape[0]})')
    return rgb


def rgb8_to_image_fields(rgb: np.ndarray, encoding: str = 'rgb8') -> dict[str, Any]:
    """Fields of a sensor_msgs/Image holding ``rgb`` (HxWx3 uint8 RGB) in ``encoding``.

    ``data`` is a flat numpy uint8 array (what rosbags serializes); an rclpy message wants
    ``array.array('B', data.tobytes())``. Rows are unpadded: step = width * channels.
    """
    rgb = _check_rgb(rgb)
    if encoding == 'rgb8':
        out = rgb
    elif encoding == 'bgr8':
        out = rgb[:, :, ::-1]
    elif encoding == 'rgba8':
        out = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif encoding == 'bgra8':
        out = np.concatenate([rgb[:, :, ::-1], np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif encoding == 'mono8':
        out = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    else:
        raise ImageConversionError(
            f'cannot write encoding {encoding!r}; supported: {", ".join(WRITE_ENCODINGS)}')
    out = np.ascontiguousarray(out)
    height, width = out.shape[:2]
    return {
        'height': height,
        'width': width,
        'encoding': encoding,
        'is_bigendian': 0,
        'step': out.size // height,
        'data': out.reshape(-1),  # [H, W, C] -> [H*W*C]
    }


def encode_compressed(rgb: np.ndarray, fmt: str = 'jpeg', *, quality: int = 90) -> tuple[str, bytes]:
    """(CompressedImage.format, data) for ``rgb`` (HxWx3 uint8 RGB), image_transport style.

    The bytes are ``cv2.imencode`` of the BGR image, so format reads "rgb8; jpeg compressed bgr8".
    """
    rgb = _check_rgb(rgb)
    if fmt not in ('jpeg', 'png'):
        raise ImageConversionError(f"compressed format must be 'jpeg' or 'png', got {fmt!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == 'jpeg' else []
    ok, encoded = cv2.imencode('.jpg' if fmt == 'jpeg' else '.png',
                               np.ascontiguousarray(rgb[:, :, ::-1]), params)
    if not ok:
        raise ImageConversionError(f'OpenCV could not encode a {rgb.shape[1]}x{rgb.shape[0]} image as {fmt}')
    return f'rgb8; {fmt} compressed bgr8', encoded.tobytes()
