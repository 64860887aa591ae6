"""Image / CompressedImage <-> numpy: every encoding, padded rows, byte order, codecs, bad input."""
import array
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from blockvla_ros.io.images import (
    DEFAULT_MAX_PIXELS, ImageConversionError, compressed_header, compressed_to_numpy, encode_compressed,
    image_to_numpy, message_to_rgb8, rgb8_to_image_fields, to_rgb8)

H, W = 5, 7
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def raw_msg(pixels, encoding, pad=0, bigendian=False, data_type='numpy'):
    """An Image-like message built by hand: each row = pixel bytes in the wire order + `pad` junk bytes."""
    pixels = np.asarray(pixels)
    height, width = pixels.shape[:2]
    wire = pixels.astype(pixels.dtype.newbyteorder('>' if bigendian else '<'))
    rows = [wire[r].tobytes() + bytes([0xAB] * pad) for r in range(height)]
    data = b''.join(rows)
    step = len(rows[0])
    if data_type == 'numpy':
        payload = np.frombuffer(data, np.uint8)
    elif data_type == 'array':
        payload = array.array('B', data)
    else:
        payload = data
    return SimpleNamespace(height=height, width=width, encoding=encoding, is_bigendian=int(bigendian),
                           step=step, data=payload)


def compressed_msg(fmt, data):
    return SimpleNamespace(format=fmt, data=np.frombuffer(data, np.uint8))


# ---- raw Image decoding -------------------------------------------------------------------------

COLOUR_CASES = {
    'rgb8': (RGB, RGB),
    'bgr8': (RGB[:, :, ::-1], RGB),
    'rgba8': (np.dstack([RGB, np.full((H, W), 9, np.uint8)]), RGB),
    'bgra8': (np.dstack([RGB[:, :, ::-1], np.full((H, W), 9, np.uint8)]), RGB),
}


@pytest.mark.parametrize('pad', [0, 3])
@pytest.mark.parametrize('data_type', ['numpy', 'array', 'bytes'])
@pytest.mark.parametrize('encoding', list(COLOUR_CASES))
def test_colour_encodings_honour_step_and_convert_to_rgb(encoding, data_type, pad):
    wire, rgb = COLOUR_CASES[encoding]
    msg = raw_msg(wire, encoding, pad=pad, data_type=data_type)
    decoded = image_to_numpy(msg)
    np.testing.assert_array_equal(decoded, wire)  # channel order kept as encoded
    out = message_to_rgb8(msg)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('encoding', ['mono8', '8UC1'])
def test_mono8_is_replicated(encoding):
    gray = RGB[:, :, 0]
    out = message_to_rgb8(raw_msg(gray, encoding, pad=1))
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


@pytest.mark.parametrize('pad', [0, 2, 3])  # 3: odd padding, rows not 2-byte aligned
@pytest.mark.parametrize('bigendian', [False, True])
@pytest.mark.parametrize('encoding', ['16UC1', 'mono16'])
def test_16bit_byte_order_and_padding(encoding, bigendian, pad):
    depth = RNG.integers(0, 65536, size=(H, W), dtype=np.uint16)
    msg = raw_msg(depth, encoding, pad=pad, bigendian=bigendian)
    if bigendian:  # the wire bytes really are big-endian: high byte first
        assert bytes(msg.data[:2]) == bytes([depth[0, 0] >> 8, depth[0, 0] & 0xFF])
    decoded = image_to_numpy(msg)
    assert decoded.dtype == np.uint16 and decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, depth)


def test_16bit_to_rgb8_rule():
    depth = np.array([[0, 257, 32768, 65535]], np.uint16)
    out = to_rgb8(depth, '16UC1')
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])  # round(v * 255 / 65535)
    assert np.all(out[:, :, 0] == out[:, :, 2])
    scaled = to_rgb8(np.array([[0, 1000, 2000, 3000]], np.uint16), 'mono16', value_max=2000)
    np.testing.assert_array_equal(scaled[0, :, 1], [0, 128, 255, 255])  # 127.5 -> 128, clipped above


def test_32fc1_decode_and_rule():
    depth = np.array([[0.0, 0.5, 1.0, 2.0], [np.nan, np.inf, -1.0, 0.25]], np.float32)
    for big in (False, True):
        msg = raw_msg(depth, '32FC1', pad=4, bigendian=big)
        np.testing.assert_array_equal(image_to_numpy(msg), depth)
    out = message_to_rgb8(raw_msg(depth, '32FC1'))
    np.testing.assert_array_equal(out[:, :, 0], [[0, 128, 255, 255], [0, 0, 0, 64]])
    np.testing.assert_array_equal(to_rgb8(depth, '32FC1', value_max=2.0)[0, :, 0], [0, 64, 128, 255])


def test_real_rclpy_image_message():
    sensor_msgs = pytest.importorskip('sensor_msgs.msg')
    fields = rgb8_to_image_fields(RGB, 'bgr8')
    msg = sensor_msgs.Image(height=fields['height'], width=fields['width'], encoding=fields['encoding'],
                            is_bigendian=fields['is_bigendian'], step=fields['step'],
                            data=array.array('B', fields['data'].tobytes()))
    np.testing.assert_array_equal(message_to_rgb8(msg), RGB)
    fmt, data = encode_compressed(RGB, 'png')
    cmsg = sensor_msgs.CompressedImage(format=fmt, data=array.array('B', data))
    np.testing.assert_array_equal(message_to_rgb8(cmsg), RGB)


# ---- writers ------------------------------------------------------------------------------------

@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8'])
def test_image_fields_round_trip(encoding):
    fields = rgb8_to_image_fields(RGB, encoding)
    channels = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1}[encoding]
    assert (fields['height'], fields['width'], fields['encoding']) == (H, W, encoding)
    assert fields['step'] == W * channels and fields['data'].size == H * W * channels
    assert fields['is_bigendian'] == 0 and fields['data'].dtype == np.uint8
    out = message_to_rgb8(SimpleNamespace(**fields))
    if encoding == 'mono8':
        gray = cv2.cvtColor(RGB, cv2.COLOR_RGB2GRAY)
        np.testing.assert_array_equal(out, np.dstack([gray] * 3))
    else:
        np.testing.assert_array_equal(out, RGB)


def test_png_round_trip_is_exact_and_jpeg_is_close():
    fmt, data = encode_compressed(RGB, 'png')
    assert fmt == 'rgb8; png compressed bgr8'
    assert data[:4] == b'\x89PNG'
    np.testing.assert_array_equal(compressed_to_numpy(compressed_msg(fmt, data)), RGB)
    # bytes are cv2.imencode of the BGR image: OpenCV itself reads them back as BGR
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), RGB[:, :, ::-1])

    smooth = np.zeros((32, 48, 3), np.uint8)
    smooth[:, :, 0], smooth[:, :, 1], smooth[:, :, 2] = 200, 40, 90  # channel order is visible
    fmt, data = encode_compressed(smooth, 'jpeg', quality=95)
    assert fmt == 'rgb8; jpeg compressed bgr8' and data[:2] == b'\xff\xd8'
    out = message_to_rgb8(compressed_msg(fmt, data))
    assert out.shape == smooth.shape
    assert np.abs(out.astype(int) - smooth).max() <= 3


def test_compressed_mono_16bit_rgb_source_and_depth():
    gray = RGB[:, :, 1]
    ok, png = cv2.imencode('.png', gray)
    assert compressed_to_numpy(compressed_msg('mono8; png compressed mono8', png.tobytes())).shape == (H, W)
    np.testing.assert_array_equal(message_to_rgb8(compressed_msg('mono8; png', png.tobytes()))[:, :, 2], gray)

    depth = RNG.integers(0, 65536, size=(H, W), dtype=np.uint16)
    ok, png16 = cv2.imencode('.png', depth)
    decoded = compressed_to_numpy(compressed_msg('16UC1; png compressed mono16', png16.tobytes()))
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, depth)
    # compressedDepth: a 12-byte config header precedes the PNG
    header = np.array([0], np.int32).tobytes() + np.array([0.0, 0.0], np.float32).tobytes()
    np.testing.assert_array_equal(
        compressed_to_numpy(compressed_msg('16UC1; compressedDepth png', header + png16.tobytes())), depth)

    # bytes that were encoded from an RGB array (format says so) are not swapped
    ok, rgb_png = cv2.imencode('.png', RGB)
    decoded = compressed_to_numpy(compressed_msg('rgb8; png compressed rgb8', rgb_png.tobytes()))
    np.testing.assert_array_equal(decoded, RGB)


def test_compressed_header_size_is_read_without_decoding():
    for ext, kind in (('.png', 'png'), ('.jpg', 'jpeg')):
        ok, data = cv2.imencode(ext, np.zeros((37, 91, 3), np.uint8))
        assert compressed_header(data.tobytes()) == (kind, 91, 37, 3)
    with pytest.raises(ImageConversionError, match='neither PNG nor JPEG'):
        compressed_header(b'not an image')


# ---- bad input ----------------------------------------------------------------------------------

def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ImageConversionError, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)


def test_unknown_encoding():
    msg = raw_msg(RGB, 'yuv422')
    _raises(r"unknown image encoding 'yuv422'.*rgb8", image_to_numpy, msg)
    _raises('unknown image encoding', to_rgb8, RGB, 'bayer_rggb8')


def test_zero_size():
    msg = raw_msg(RGB, 'rgb8')
    msg.height = 0
    _raises('zero size', image_to_numpy, msg)
    msg = raw_msg(RGB, 'rgb8')
    msg.width = 0
    _raises('zero size', message_to_rgb8, msg)
    _raises('zero size', rgb8_to_image_fields, np.zeros((0, 4, 3), np.uint8))


def test_step_smaller_than_row():
    msg = raw_msg(RGB, 'rgb8')
    msg.step = W * 3 - 1
    _raises(r'step 20 is smaller than width\*bytes_per_pixel = 7\*3 = 21', image_to_numpy, msg)
    msg16 = raw_msg(np.zeros((H, W), np.uint16), '16UC1')
    msg16.step = W  # a producer that forgot the 2-byte depth
    _raises('smaller than width', image_to_numpy, msg16)


def test_data_shorter_than_height_times_step():
    msg = raw_msg(RGB, 'rgb8', pad=2)
    msg.data = msg.data[:-1]
    _raises(r'expected height\*step = 5\*23 = 115', image_to_numpy, msg)


def test_too_large_is_rejected_cleanly():
    big = SimpleNamespace(height=8192, width=8192, encoding='mono8', is_bigendian=0, step=8192,
                          data=np.zeros(8192 * 8192, np.uint8))
    assert 8192 * 8192 > DEFAULT_MAX_PIXELS
    _raises('too large: 8192x8192', image_to_numpy, big)
    _raises('too large', message_to_rgb8, raw_msg(RGB, 'rgb8'), max_pixels=H * W - 1)
    assert message_to_rgb8(raw_msg(RGB, 'rgb8'), max_pixels=H * W).shape == (H, W, 3)
    fmt, data = encode_compressed(RGB, 'jpeg')
    _raises('compressed image.*too large', message_to_rgb8, compressed_msg(fmt, data), max_pixels=H * W - 1)
    ok, png = cv2.imencode('.png', np.zeros((8192, 8192), np.uint8))
    _raises('too large: 8192x8192', compressed_to_numpy, compressed_msg('mono8; png', png.tobytes()))


def test_undecodable_compressed():
    _raises('neither PNG nor JPEG', compressed_to_numpy, compressed_msg('jpeg', b'\xff\xd8garbage' * 10))
    _raises('ends before a frame header', compressed_to_numpy, compressed_msg('jpeg', b'\xff\xd8\xffgarbage' * 10))
    fmt, data = encode_compressed(RGB, 'png')
    _raises('could not be decoded', message_to_rgb8, compressed_msg(fmt, data[:len(data) // 2]))
    _raises('has no data', compressed_to_numpy, compressed_msg('jpeg', b''))
    _raises('holds no PNG', compressed_to_numpy, compressed_msg('16UC1; compressedDepth png', b'\0' * 40))
    _raises('not supported', compressed_to_numpy, compressed_msg('32FC1; compressedDepth png', data))


def test_bad_arrays_for_writers_and_to_rgb8():
    _raises('HxWx3 uint8', rgb8_to_image_fields, RGB.astype(np.float32))
    _raises('HxWx3 uint8', encode_compressed, RGB[:, :, 0])
    _raises("cannot write encoding '16UC1'", rgb8_to_image_fields, RGB, '16UC1')
    _raises("'jpeg' or 'png'", encode_compressed, RGB, 'bmp')
    _raises('does not match encoding', to_rgb8, RGB, 'rgba8')
    _raises('dtype uint8 does not match', to_rgb8, RGB[:, :, 0], '16UC1')
    _raises('value_max must be > 0', to_rgb8, np.zeros((2, 2), np.uint16), '16UC1', value_max=0)
