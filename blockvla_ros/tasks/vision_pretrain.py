"""Pretrain the built-in patch encoder on rendered tabletop scenes (the demo's stand-in for a pretrained vision tower).

A real VLA starts from a vision tower that already sees objects (SigLIP, DINO); the demo's patch encoder starts from
random weights, and learning *what is where* from action labels alone costs thousands of policy steps. This step
teaches it that directly, from labels the renderer knows: for every patch, which coloured object's centre lies in
it (or none) and where in the patch. A few seconds of CPU; the weights go to a safetensors file that the training
config loads with `vision.init_from`. Only the encoder is saved; the probe head is thrown away.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from blockvla_ros.tasks.render import TableRenderer
from blockvla_ros.tasks.spec import COLORS
from blockvla_ros.tasks.tabletop import _place_objects

log = logging.getLogger(__name__)


@dataclass
class Scenes:
    images: np.ndarray   # [N, S, S, 3] uint8
    labels: np.ndarray   # [N, G*G] int64: 0 = no object centre in the patch, k + 1 = COLORS[k]
    offsets: np.ndarray  # [N, G*G, 2] float32: centre within its patch, in patch units, -0.5..0.5 (x right, y down)
    # Patches wider than half the object separation can hold two centres; the later colour wins (rare at 4x4).


def render_scenes(n: int, image_size: int, grid: int, seed: int = 0) -> Scenes:
    """`n` random layouts, each with a random effector position, press state and set of touched objects."""
    rng = np.random.default_rng(seed)
    renderer = TableRenderer(image_size)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    labels = np.zeros((n, grid * grid), np.int64)
    offsets = np.zeros((n, grid * grid, 2), np.float32)
    for i in range(n):
        objects = _place_objects(rng)
        renderer.set_objects(objects)
        touched = [k for k in range(len(objects)) if rng.random() < 0.25]
        images[i] = renderer.render(touched, rng.uniform(-1, 1, size=2), bool(rng.random() < 0.2))
        for obj in objects:
            col_f = (obj.xy[0] + 1) / 2 * grid       # patch units, x right
            row_f = (1 - obj.xy[1]) / 2 * grid       # patch units, y down
            col, row = min(grid - 1, int(col_f)), min(grid - 1, int(row_f))
            labels[i, row * grid + col] = COLORS.index(obj.color) + 1
            offsets[i, row * grid + col] = (col_f - col - 0.5, row_f - row - 0.5)
    return Scenes(images, labels, offsets)


def pretrain_patch_encoder(model_cfg, out, steps: int = 600, batch_size: int = 64, lr: float = 2e-3,
                           scenes: int = 4000, seed: int = 0) -> dict:
    """Train `model_cfg`'s patch encoder (its own init: pos_embed is honoured) with a linear probe on per-patch
    colour class + centre offset; write its weights to `out` (safetensors, atomic). Returns the figures: the
    held-out per-patch accuracy on patches that hold an object centre, before and after, and the chance level."""
    import torch
    from safetensors.torch import save

    from blockvla_ros.io.atomic import atomic_write_bytes
    from blockvla_ros.model.vision import PatchEncoder, build_vision_encoder
    from blockvla_ros.runtime.preprocess import prepare_image

    if steps < 1 or batch_size < 1 or scenes < 2:
        raise ValueError(f'steps, batch_size must be >= 1 and scenes >= 2, got {steps}, {batch_size}, {scenes}')
    if model_cfg.vision.get('type', 'patch') != 'patch':
        raise ValueError("pretrain-vision trains the built-in patch encoder; model.vision.type is "
                         f"{model_cfg.vision.get('type')!r}")
    grid = model_cfg.image_size // int(model_cfg.vision['patch_size'])
    torch.manual_seed(seed)
    encoder = build_vision_encoder(model_cfg.vision, model_cfg.image_size)
    assert isinstance(encoder, PatchEncoder)
    head = torch.nn.Linear(encoder.out_dim, len(COLORS) + 1 + 2)

    data = render_scenes(scenes, model_cfg.image_size, grid, seed)
    pixels = torch.from_numpy(np.concatenate([prepare_image(im, model_cfg) for im in data.images]))
    labels, offsets = torch.from_numpy(data.labels), torch.from_numpy(data.offsets)
    n_val = max(1, scenes // 10)
    val = slice(0, n_val)

    def object_accuracy() -> float:
        with torch.no_grad():
            pred = head(encoder(pixels[val]))[..., :len(COLORS) + 1].argmax(-1)
        has = labels[val] > 0
        return float((pred[has] == labels[val][has]).float().mean())

    before = object_accuracy()
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    n_train = scenes - n_val
    for step in range(1, steps + 1):
        idx = n_val + torch.randint(n_train, (batch_size,), generator=gen)
        f = head(encoder(pixels[idx]))
        ce = torch.nn.functional.cross_entropy(f[..., :len(COLORS) + 1].reshape(-1, len(COLORS) + 1),
                                               labels[idx].reshape(-1))
        has = (labels[idx] > 0).float()[..., None]
        reg = ((f[..., len(COLORS) + 1:] - offsets[idx]) ** 2 * has).sum() / has.sum().clamp(min=1)
        loss = ce + reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            log.info('pretrain-vision step %d: class loss %.3f, offset loss %.3f', step, ce.item(), reg.item())
    after = object_accuracy()

    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    atomic_write_bytes(out, save(state, metadata={'written_by': 'blockvla-task pretrain-vision',
                                                  'steps': str(steps), 'seed': str(seed)}))
    return {'out': str(out), 'steps': steps, 'seconds': round(time.perf_counter() - t0, 1),
            'object_patch_accuracy_before': round(before, 3), 'object_patch_accuracy': round(after, 3),
            'chance': round(1 / len(COLORS), 3)}
