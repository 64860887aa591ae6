"""Hostile image messages: decompression bombs and a seeded random corpus (issue 13 item 2 and its fuzz test).

Shared by test_image_fuzz.py (message -> image conversion) and test_bag_bombs.py (bags holding such frames).
"""
import array
import random
import struct
import zlib
from types import SimpleNamespace

import cv2
import numpy as np

from blockvla_ros.io.images import ENCODINGS

BOMB_SIDE = 30000  # 30000x30000: 2.7 GB as RGB, what the bombs of issue 13 decoded to


def small_jpeg(side: int = 16) -> bytes:
    ok, data = cv2.imencode('.jpg', np.full((side, side, 3), 100, np.uint8))
    return data.tobytes()


def jpeg_bomb_junk_after_app0(side: int = BOMB_SIDE) -> bytes:
    """A ~600-byte JPEG whose SOF claims side x side, with a junk byte after APP0 that hid the SOF from the old
    header check (libjpeg skips the junk and decodes the full frame)."""
    data = bytearray(small_jpeg())
    sof = data.find(b'\xff\xc0')
    data[sof + 5:sof + 9] = struct.pack('>HH', side, side)  # height, width
    app0_end = 4 + struct.unpack('>H', data[4:6])[0]  # SOI (2) + FFE0 (2) + its length
    data[app0_end:app0_end] = b'\x00'
    return bytes(data)


def bmp_rle8_bomb(side: int = BOMB_SIDE) -> bytes:
    """A ~1 kB RLE8 BMP of side x side (one end-of-bitmap record): OpenCV would allocate the whole frame."""
    palette = bytes(range(256)) * 4
    pixels = b'\x00\x01'  # end of bitmap
    offset = 14 + 40 + len(palette)
    info = struct.pack('<IiiHHIIiiII', 40, side, side, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b'BM' + struct.pack('<IHHI', offset + len(pixels), 0, 0, offset) + info + palette + pixels


def jpeg_many_scans(extra: int = 200) -> bytes:
    """A progressive JPEG whose smallest scan is repeated `extra` times: each scan is another pass over the frame, so
    thousands of them make a small file decode for seconds."""
    ok, data = cv2.imencode('.jpg', np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8),
                            [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    data = data.tobytes()
    starts = [i for i in range(len(data) - 1) if data[i:i + 2] == b'\xff\xda']
    scans = [data[a:b] for a, b in zip(starts, starts[1:] + [len(data) - 2])]
    return data[:starts[0]] + b''.join(scans) + min(scans[1:], key=len) * extra + b'\xff\xd9'


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid-looking PNG header of side x side grey pixels with a small zlib stream of zero rows."""
    ihdr = struct.pack('>IIBBBBB', side, side, 8, 0, 0, 0, 0)
    rows = zlib.compress(b'\x00' * (side + 1) * 64, 9)
    return b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr) + _png_chunk(b'IDAT', rows) + _png_chunk(b'IEND', b'')


def other_formats() -> dict:
    """Formats OpenCV decodes but we do not accept."""
    img = np.full((8, 8, 3), 7, np.uint8)
    out = {'bmp_rle8_bomb': bmp_rle8_bomb()}
    for ext in ('.bmp', '.tiff', '.ppm', '.webp', '.hdr'):
        try:
            ok, data = cv2.imencode(ext, img)
        except cv2.error:
            continue
        if ok:
            out[ext] = data.tobytes()
    return out


def bombs() -> dict:
    return {'jpeg_junk_after_app0': jpeg_bomb_junk_after_app0(), 'png_30000': png_bomb(),
            'jpeg_many_scans': jpeg_many_scans(),
            **other_formats()}


def compressed(fmt: str, data: bytes) -> SimpleNamespace:
    return SimpleNamespace(format=fmt, data=data)


# --- the seeded random corpus ------------------------------------------------------------------------------------
FORMATS = ('rgb8; jpeg compressed bgr8', 'rgb8; png compressed bgr8', 'jpeg', 'png', 'mono8; png',
           'rgb8; png compressed rgb8', '16UC1; compressedDepth png', '32FC1; compressedDepth png', '', 'bmp',
           'compressed', '\x00\xff')
SIZES = (0, 1, 2, 3, 7, 16, 33, 64, 255, 4096, 4097, BOMB_SIDE, 1 << 31, -1)


def _raw(rng: random.Random) -> SimpleNamespace:
    encoding = rng.choice([*ENCODINGS, 'yuv422', 'bayer_rggb8', '', 'RGB8'])
    dtype, channels = ENCODINGS.get(encoding, (np.dtype(np.uint8), 3))
    height, width = rng.choice(SIZES[:8]) if rng.random() < 0.8 else rng.choice(SIZES), rng.choice(SIZES[:9])
    row = max(width, 0) * channels * dtype.itemsize
    step = rng.choice((row, row + rng.randint(1, 9), max(row - 1, 0), 0, 1 << 40))
    length = max(height, 0) * step if height * step < (1 << 24) else rng.randint(0, 4096)
    length = rng.choice((length, max(length - 1, 0), length + 5, 0))
    payload = bytes(rng.getrandbits(8) for _ in range(min(length, 1 << 16))) * (length // (1 << 16) + 1)
    payload = payload[:length]
    kind = rng.choice(('bytes', 'array', 'numpy', 'list'))
    data = {'bytes': payload, 'array': array.array('B', payload), 'numpy': np.frombuffer(payload, np.uint8),
            'list': list(payload[:64])}[kind]
    return SimpleNamespace(height=height, width=width, encoding=encoding, is_bigendian=rng.randint(0, 1),
                           step=step, data=data)


def _encoded(rng: random.Random) -> bytes:
    h, w = rng.randint(1, 64), rng.randint(1, 64)
    kind = rng.choice(('jpg', 'png', 'png16', 'pngmono', 'pngrgba', 'big'))
    if kind == 'big':
        ok, data = cv2.imencode('.png', np.zeros((2048, 2048), np.uint8))  # a 16 kB zlib payload of 4 MP
        return data.tobytes()
    channels = {'pngmono': 1, 'pngrgba': 4}.get(kind, 3)
    dtype = np.uint16 if kind == 'png16' else np.uint8
    img = np.random.default_rng(rng.getrandbits(32)).integers(0, 255, (h, w, channels)).astype(dtype)
    ok, data = cv2.imencode('.jpg' if kind == 'jpg' else '.png', img)
    return data.tobytes()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    what = rng.choice(('none', 'truncate', 'flip', 'junk', 'dims', 'prefix', 'header_flip'))
    if what == 'truncate':
        b = b[:rng.randint(0, len(b))]
    elif what == 'flip':
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif what == 'header_flip':
        for _ in range(rng.randint(1, 3)):
            if len(b) > 2:
                b[rng.randrange(2, min(len(b), 200))] = rng.getrandbits(8)
    elif what == 'junk':
        at = rng.randint(2, max(2, min(len(b), 40)))
        b[at:at] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4)))
    elif what == 'dims':
        side = rng.choice((0, 1, 8, 4097, BOMB_SIDE, 65535))
        sof = b.find(b'\xff\xc0')
        if b[:4] == b'\x89PNG':
            b[16:24] = struct.pack('>II', side, rng.choice((side, 1)))
        elif sof > 0:
            b[sof + 5:sof + 9] = struct.pack('>HH', side, rng.choice((side, 1)))
    elif what == 'prefix':
        b = bytearray(rng.choice((b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'BM', b'\x00' * 12))) + b
    return bytes(b)


def random_corpus(seed: int, n: int):
    """Yields n messages (raw Image-like and CompressedImage-like), reproducible from seed; the bombs first."""
    rng = random.Random(seed)
    fixed = [compressed(rng.choice(FORMATS[:4]), data) for data in bombs().values()]
    yield from fixed
    for _ in range(n - len(fixed)):
        if rng.random() < 0.3:
            yield _raw(rng)
        else:
            yield compressed(rng.choice(FORMATS), _mutate(rng, _encoded(rng)))
