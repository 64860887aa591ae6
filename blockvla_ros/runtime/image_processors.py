"""The HF image processors of the supported VLM families, reimplemented in numpy from their saved config.

A VLM policy sees exactly the pixels its pretrained vision tower was trained on: the same resizes (Pillow's
arithmetic, `runtime.pil_resample`), rescale, normalization and layout as the HF processor (its PIL backend), at one
fixed resolution so every graph has static shapes. Pure numpy: the runtime imports neither torch nor transformers.

    family     HF processor                      fixed resolution            output (the vision graph's input)
    siglip     PaliGemma's SiglipImageProcessor  size.height x size.width    float32 [1, 3, H, W]
    idefics3   Idefics3/SmolVLM, no splitting    max_image_size (square)     float32 [1, 3, S, S]
    qwen2_vl   Qwen2-VL / Qwen2.5-VL             `grid_hw` (pixels, /28)     float32 [1, gh*gw, 3*tp*p*p] (patches)

Each processor splits into `resize` (uint8 camera frame -> uint8 at the fixed resolution, what a dataset stores)
and `pixels` (uint8 at the fixed resolution -> the float input), so training and the runtime share every step.
"""
from __future__ import annotations

import math

import numpy as np

from . import pil_resample

IMAGENET_STANDARD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_SIZE = 4096  # Idefics3/SmolVLM: absolute maximum side after the first resize


def _check_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f'image must be uint8 RGB [H, W, 3], got {img.dtype} {img.shape}')
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f'image is empty: shape {img.shape}')
    return img


class ImageProcessor:
    """Base: rescale + normalize exactly as the HF PIL backend (float64 rescale -> float32, float32 normalize)."""

    family = 'abstract'
    defaults: dict = {}

    def __init__(self, config: dict):
        self.config = {**self.defaults, **dict(config)}
        c = self.config
        self.do_rescale = bool(c.get('do_rescale', True))
        self.rescale_factor = float(c.get('rescale_factor', 1 / 255))
        self.do_normalize = bool(c.get('do_normalize', True))
        self.mean = np.asarray(c.get('image_mean'), dtype=np.float32).reshape(-1)
        self.std = np.asarray(c.get('image_std'), dtype=np.float32).reshape(-1)
        if self.do_normalize and (self.mean.shape != (3,) or self.std.shape != (3,) or np.any(self.std == 0)):
            raise ValueError(f'{self.family} processor config: image_mean / image_std must be 3 values (std != 0), '
                             f'got {c.get("image_mean")} / {c.get("image_std")}')
        self.resample = int(c.get('resample', pil_resample.BICUBIC))
        if self.resample not in pil_resample.FILTER_NAMES:
            raise ValueError(f'{self.family} processor config: resample {self.resample} is not supported '
                             f'({pil_resample.FILTER_NAMES})')

    # --- the two halves ---------------------------------------------------------------------------------------
    def resize(self, image) -> np.ndarray:
        """uint8 [H, W, 3] (any size) -> uint8 [h, w, 3] at the fixed resolution."""
        raise NotImplementedError

    def pixels(self, resized: np.ndarray) -> np.ndarray:
        """uint8 at the fixed resolution -> the vision graph's float32 input."""
        raise NotImplementedError

    def __call__(self, image) -> np.ndarray:
        return self.pixels(self.resize(image))

    @property
    def resized_shape(self) -> tuple:
        """(h, w) of `resize`'s output."""
        raise NotImplementedError

    @property
    def pixel_shape(self) -> tuple:
        """Shape of `pixels`' output."""
        raise NotImplementedError

    # --- shared steps -------------------------------------------------------------------------------------------
    def _normalized_chw(self, resized: np.ndarray) -> np.ndarray:
        """uint8 [h, w, 3] -> float32 [3, h, w] rescaled and normalized."""
        img = _check_rgb(resized)
        if img.shape[:2] != self.resized_shape:
            raise ValueError(f'{self.family}: expected a {self.resized_shape} image from resize(), got {img.shape[:2]}')
        x = img.transpose(2, 0, 1)  # [h, w, 3] -> [3, h, w]
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return np.ascontiguousarray(x, dtype=np.float32)

    def _resize_to(self, image, height: int, width: int) -> np.ndarray:
        img = _check_rgb(image)
        if img.shape[:2] == (height, width):
            return img
        return pil_resample.resize(img, height, width, self.resample)


class SiglipProcessor(ImageProcessor):
    """PaliGemma / PaliGemma2: a plain resize to size.height x size.width (aspect not kept)."""

    family = 'siglip'
    defaults = {'image_mean': IMAGENET_STANDARD, 'image_std': IMAGENET_STANDARD, 'resample': pil_resample.BICUBIC,
                'size': {'height': 224, 'width': 224}}

    def __init__(self, config: dict):
        super().__init__(config)
        size = self.config['size']
        if not isinstance(size, dict) or not size.get('height') or not size.get('width'):
            raise ValueError(f'siglip processor config: size must be {{"height": H, "width": W}}, got {size}')
        if not self.config.get('do_resize', True):
            raise ValueError('siglip processor config: do_resize false gives image-dependent shapes; a policy needs '
                             'a fixed resolution')
        self.height, self.width = int(size['height']), int(size['width'])

    @property
    def resized_shape(self) -> tuple:
        return self.height, self.width

    @property
    def pixel_shape(self) -> tuple:
        return 1, 3, self.height, self.width

    def resize(self, image) -> np.ndarray:
        return self._resize_to(image, self.height, self.width)

    def pixels(self, resized) -> np.ndarray:
        return self._normalized_chw(resized)[None]  # [3, H, W] -> [1, 3, H, W]


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """Idefics3/SmolVLM's first resize: longest edge -> `longest`, aspect kept, short side even, then <= 4096."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


class Idefics3Processor(ImageProcessor):
    """Idefics3 / SmolVLM / SmolVLM2 without image splitting: (optionally) longest edge -> size.longest_edge, then
    a square max_image_size.longest_edge resize; one global image, no padding needed."""

    family = 'idefics3'
    defaults = {'image_mean': IMAGENET_STANDARD, 'image_std': IMAGENET_STANDARD, 'resample': pil_resample.LANCZOS,
                'size': {'longest_edge': 4 * 364}, 'max_image_size': {'longest_edge': 364}}

    def __init__(self, config: dict):
        super().__init__(config)
        if self.config.get('do_image_splitting', True):
            raise ValueError('idefics3 processor config: do_image_splitting must be false (splitting makes the '
                             'image-token count depend on the image; a policy needs static shapes)')
        self.do_resize = bool(self.config.get('do_resize', True))
        self.side = int(self.config['max_image_size']['longest_edge'])
        size = self.config.get('size') or {}
        if self.do_resize and not size.get('longest_edge'):
            raise ValueError(f'idefics3 processor config: size must hold longest_edge, got {size}')
        self.longest = int(size.get('longest_edge', self.side))

    @property
    def resized_shape(self) -> tuple:
        return self.side, self.side

    @property
    def pixel_shape(self) -> tuple:
        return 1, 3, self.side, self.side

    def resize(self, image) -> np.ndarray:
        img = _check_rgb(image)
        if self.do_resize:
            img = self._resize_to(img, *_longest_edge_size(img.shape[0], img.shape[1], self.longest))
        return self._resize_to(img, self.side, self.side)

    def pixels(self, resized) -> np.ndarray:
        return self._normalized_chw(resized)[None]  # [3, S, S] -> [1, 3, S, S]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's choice of resolution for an image: sides multiples of `factor`, pixels within [min, max]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f'aspect ratio must be below 200, got {max(height, width) / min(height, width):.1f}')
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen2VLProcessor(ImageProcessor):
    """Qwen2-VL / Qwen2.5-VL at one fixed grid: every image is resized to `grid_hw` pixels (multiples of
    patch_size * merge_size), then cut into the processor's flat patches (each frame repeated temporal_patch_size
    times). Equal to the HF processor for every image whose `smart_resize` is that grid (the camera resolution
    the grid was chosen for); other images are resized to the grid as well rather than changing the shapes."""

    family = 'qwen2_vl'
    defaults = {'image_mean': OPENAI_CLIP_MEAN, 'image_std': OPENAI_CLIP_STD, 'resample': pil_resample.BICUBIC,
                'patch_size': 14, 'temporal_patch_size': 2, 'merge_size': 2}

    def __init__(self, config: dict):
        super().__init__(config)
        c = self.config
        self.patch, self.temporal = int(c['patch_size']), int(c['temporal_patch_size'])
        self.merge = int(c['merge_size'])
        grid = c.get('grid_hw')
        factor = self.patch * self.merge
        if not (isinstance(grid, (list, tuple)) and len(grid) == 2 and all(int(g) > 0 and int(g) % factor == 0
                                                                           for g in grid)):
            raise ValueError(f'qwen2_vl processor: grid_hw must be [height, width] in pixels, multiples of '
                             f'patch_size * merge_size = {factor}, got {grid}')
        if not c.get('do_resize', True):
            raise ValueError('qwen2_vl processor config: do_resize false gives image-dependent shapes')
        self.height, self.width = int(grid[0]), int(grid[1])

    @property
    def resized_shape(self) -> tuple:
        return self.height, self.width

    @property
    def grid_thw(self) -> tuple:
        """(t, h, w) in patches, as the HF processor's image_grid_thw."""
        return 1, self.height // self.patch, self.width // self.patch

    @property
    def pixel_shape(self) -> tuple:
        _, gh, gw = self.grid_thw
        return 1, gh * gw, 3 * self.temporal * self.patch * self.patch

    def resize(self, image) -> np.ndarray:
        return self._resize_to(image, self.height, self.width)

    def pixels(self, resized) -> np.ndarray:
        x = self._normalized_chw(resized)  # [3, H, W]
        p, m, t = self.patch, self.merge, self.temporal
        _, gh, gw = self.grid_thw
        x = x.reshape(3, gh // m, m, p, gw // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # -> [gh/m, gw/m, m, m, 3, p, p]
        x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])  # frame repeated t times
        return np.ascontiguousarray(x.reshape(1, gh * gw, 3 * t * p * p), dtype=np.float32)  # one image


PROCESSORS = {'siglip': SiglipProcessor, 'idefics3': Idefics3Processor, 'qwen2_vl': Qwen2VLProcessor}
_TYPES = {'SiglipImageProcessor': 'siglip', 'Idefics3ImageProcessor': 'idefics3', 'SmolVLMImageProcessor': 'idefics3',
          'Qwen2VLImageProcessor': 'qwen2_vl'}


def processor_family(config: dict) -> str:
    """The numpy processor for a saved `preprocessor_config.json` (its image_processor_type, Fast/Pil or not)."""
    kind = str(config.get('image_processor_type', ''))
    for suffix in ('Fast', 'Pil'):
        kind = kind[:-len(suffix)] if kind.endswith(suffix) else kind
    if kind not in _TYPES:
        raise ValueError(f'image_processor_type {config.get("image_processor_type")!r} is not supported; supported: '
                         f'{sorted(_TYPES)}')
    return _TYPES[kind]


def build_image_processor(config: dict) -> ImageProcessor:
    """A numpy processor from a processor config dict (the saved preprocessor_config.json + the policy's fixed
    resolution settings)."""
    return PROCESSORS[processor_family(config)](config)
