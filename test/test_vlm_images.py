"""The numpy image path of the VLM families equals Pillow and the HF processors (pixel values <= 1e-5).

runtime.pil_resample is compared with Pillow itself (every filter the processors use, up- and downscaling, both pass
orders); runtime.image_processors with the HF processors' PIL backend, built from tiny processor configs saved to a
folder and loaded back with AutoImageProcessor.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from blockvla_ros.runtime import pil_resample
from blockvla_ros.runtime.image_processors import build_image_processor, processor_family, smart_resize

FILTERS = [pil_resample.BILINEAR, pil_resample.BICUBIC, pil_resample.LANCZOS, pil_resample.BOX,
           pil_resample.HAMMING]


def _pil(img, h, w, resample):
    return np.array(Image.fromarray(img).resize((w, h), resample=resample))


@pytest.mark.parametrize('resample', FILTERS)
def test_resize_is_pillow_bit_for_bit(resample):
    rng = np.random.default_rng(resample)
    sizes = [((48, 64), (224, 224)), ((480, 640), (56, 84)), ((37, 91), (90, 13)), ((120, 30), (7, 29)),
             ((64, 64), (64, 200)), ((200, 20), (31, 18)), ((1, 5), (3, 1)), ((300, 9), (12, 9))]
    sizes += [((int(a), int(b)), (int(c), int(d))) for a, b, c, d in rng.integers(1, 160, (40, 4))]
    for (h, w), (oh, ow) in sizes:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(pil_resample.resize(img, oh, ow, resample), _pil(img, oh, ow, resample)), \
            (h, w, oh, ow)


def test_resize_refuses_what_it_cannot_do():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match='NEAREST'):
        pil_resample.resize(img, 2, 2, pil_resample.NEAREST)
    with pytest.raises(ValueError, match='uint8'):
        pil_resample.resize(img.astype(np.float32), 2, 2, pil_resample.BICUBIC)
    with pytest.raises(ValueError, match='positive'):
        pil_resample.resize(img, 0, 2, pil_resample.BICUBIC)


def _saved(tmp_path, processor) -> tuple:
    """Save an HF image processor to a folder; -> (its preprocessor_config.json dict, reloaded with AutoImage...)."""
    from transformers import AutoImageProcessor

    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / 'preprocessor_config.json').read_text())
    return config, AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True, backend='pil')


def _compare(ours, hf, images, **kw):
    for img in images:
        ref = hf(images=[img], return_tensors='np', **kw)['pixel_values']
        out = ours(img)
        assert ref.size == out.size, (img.shape, ref.shape, out.shape)
        assert np.abs(ref.reshape(out.shape) - out).max() <= 1e-5, img.shape


def _images(seed, sizes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_siglip_processor_equals_hf(tmp_path):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    config, hf = _saved(tmp_path, SiglipImageProcessorPil(size={'height': 56, 'width': 56}))
    ours = build_image_processor(config)
    assert processor_family(config) == 'siglip' and ours.pixel_shape == (1, 3, 56, 56)
    _compare(ours, hf, _images(0, [(48, 64), (480, 640), (56, 56), (100, 37)]))


@pytest.mark.parametrize('kind', ['smolvlm', 'idefics3'])
def test_idefics3_processor_without_splitting_equals_hf(tmp_path, kind):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    cls = SmolVLMImageProcessorPil if kind == 'smolvlm' else Idefics3ImageProcessorPil
    config, hf = _saved(tmp_path, cls(size={'longest_edge': 96}, max_image_size={'longest_edge': 48},
                                      do_image_splitting=False))
    ours = build_image_processor(config)
    assert processor_family(config) == 'idefics3' and ours.pixel_shape == (1, 3, 48, 48)
    _compare(ours, hf, _images(1, [(48, 64), (100, 37), (480, 640), (48, 48), (7, 300)]))
    with pytest.raises(ValueError, match='do_image_splitting'):
        build_image_processor({**config, 'do_image_splitting': True})


def test_qwen2_vl_processor_at_its_grid_equals_hf(tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config, hf = _saved(tmp_path, Qwen2VLImageProcessorPil())
    ours = build_image_processor({**config, 'grid_hw': [56, 84]})
    assert ours.grid_thw == (1, 4, 6) and ours.pixel_shape == (1, 24, 3 * 2 * 14 * 14)
    lo, hi = hf.size['shortest_edge'], hf.size['longest_edge']
    sizes = [(56, 84), (60, 80), (50, 90), (62, 88)]  # every size whose smart_resize is the policy's grid
    assert all(smart_resize(h, w, 28, lo, hi) == (56, 84) for h, w in sizes)
    _compare(ours, hf, _images(2, sizes))
    with pytest.raises(ValueError, match='grid_hw'):
        build_image_processor({**config, 'grid_hw': [50, 84]})


def test_processor_configs_are_checked():
    with pytest.raises(ValueError, match='not supported'):
        build_image_processor({'image_processor_type': 'CLIPImageProcessor'})
    with pytest.raises(ValueError, match='image_mean'):
        build_image_processor({'image_processor_type': 'SiglipImageProcessor', 'image_mean': [0.5]})
    with pytest.raises(ValueError, match='resample'):
        build_image_processor({'image_processor_type': 'SiglipImageProcessorPil', 'resample': 0})
    proc = build_image_processor({'image_processor_type': 'SiglipImageProcessorFast'})
    with pytest.raises(ValueError, match='uint8 RGB'):
        proc(np.zeros((8, 8), np.uint8))


def test_the_numpy_path_imports_neither_torch_nor_transformers():
    code = ('import sys, numpy as np\n'
            'from blockvla_ros.runtime.image_processors import build_image_processor\n'
            'p = build_image_processor({"image_processor_type": "Qwen2VLImageProcessor", "grid_hw": [28, 56]})\n'
            'p(np.zeros((30, 50, 3), np.uint8))\n'
            'print(sorted(m for m in ("torch", "transformers", "PIL") if m in sys.modules))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == '[]'
