"""Observation -> PrefixInputs in numpy (shared by every engine, the node, replay and training data)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..model.action_tokenizer import ActionTokenizer
from ..model.config import BlockVLAConfig
from .engine import PrefixInputs


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3]: area averaging when shrinking, bilinear when growing."""
    if image.shape[:2] == (size, size):
        return image
    import cv2

    shrink = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _check_image(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'image must be RGB with shape [H, W, 3], got shape {img.shape}')
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f'image is empty: shape {img.shape}')
    if img.dtype != np.uint8:
        raise ValueError(f'image must be uint8 RGB, got dtype {img.dtype}')
    return img


class PatchImageProcessor:
    """The built-in vision encoders' input: resize to S x S (OpenCV), /255, normalize with the config's mean/std."""

    def __init__(self, config: BlockVLAConfig):
        self.size = config.image_size
        self.mean = np.asarray(config.image_mean, np.float32)
        self.std = np.asarray(config.image_std, np.float32)

    def resize(self, image) -> np.ndarray:
        return resize_rgb(_check_image(image), self.size)

    def pixels(self, resized: np.ndarray) -> np.ndarray:
        x = (resized.astype(np.float32) / 255.0 - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # [S, S, 3] -> [1, 3, S, S]

    def __call__(self, image) -> np.ndarray:
        return self.pixels(self.resize(image))


def image_processor_for(config: BlockVLAConfig):
    """The image path of a policy: its VLM's processor (numpy, from config.vlm_processor) or the built-in one.

    Each has `resize` (uint8 camera frame -> uint8 at the policy's resolution; what a dataset keeps) and `pixels`
    (that -> the vision graph's float32 input with a leading batch of 1)."""
    if config.is_vlm:
        from .image_processors import build_image_processor

        if config.vlm_processor is None:
            raise ValueError('the VLM image processor is resolved when the policy is built (model.vlm_processor)')
        return build_image_processor(config.vlm_processor)
    return PatchImageProcessor(config)


def prepare_image(image: np.ndarray, config: BlockVLAConfig) -> np.ndarray:
    """RGB uint8 [H, W, 3] (any size) -> the vision input [1, ...] (built-in encoders: normalized [1, 3, S, S])."""
    return image_processor_for(config)(_check_image(image))


class Preprocessor:
    def __init__(self, config: BlockVLAConfig, text_tokenizer, action_tokenizer: Optional[ActionTokenizer] = None):
        self.config = config
        self.text = text_tokenizer
        self.actions = action_tokenizer
        self.images = image_processor_for(config)
        self._last_text = None

    def __call__(self, image: np.ndarray, instruction: str, state=None) -> PrefixInputs:
        ids, valid = self._tokenize(instruction)
        st = None
        if self.config.state_dim:
            if state is None:
                raise ValueError(f'this policy needs a {self.config.state_dim}-dim state (joint_states); none given')
            if self.actions is None:
                raise ValueError('normalizing the state needs stats.json')
            st = self.actions.normalize_state(state)[None]  # [S] -> [1, S]
        return PrefixInputs(pixels=self.images(_check_image(image)), text_ids=ids[None], text_valid=valid[None],
                            state=st)

    def _tokenize(self, instruction: str):
        if self._last_text is not None and self._last_text[0] == instruction:
            return self._last_text[1]
        out = self.text.encode(instruction)
        self._last_text = (instruction, out)
        return out
