"""Vision encoders: a small built-in patch encoder (default) or any HF vision model (SigLIP, CLIP) by config."""
from __future__ import annotations

import torch
from torch import nn

from .config import POS_EMBEDS


def sincos_grid(grid: int, dim: int) -> torch.Tensor:
    """A fixed 2-D sin/cos position code [grid*grid, dim] (row-major patches): dim/4 frequencies each of
    sin(x), cos(x), sin(y), cos(y), x and y the patch centre in [-1, 1] (y up). Nearby patches get nearby codes,
    so an object's position reads off linearly from the start (a random init has to learn that)."""
    if dim % 4:
        raise ValueError(f'vision.pos_embed sincos needs vision.dim divisible by 4, got {dim}')
    nf = dim // 4
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
    x = (cols.flatten().float() + 0.5) / grid * 2 - 1
    y = 1 - (rows.flatten().float() + 0.5) / grid * 2
    freq = torch.pi * (torch.arange(nf).float() + 0.5) / 2
    return torch.cat([torch.sin(x[:, None] * freq), torch.cos(x[:, None] * freq),
                      torch.sin(y[:, None] * freq), torch.cos(y[:, None] * freq)], dim=1)


class PatchEncoder(nn.Module):
    """ViT-style patchify + one pre-norm MLP mixer layer: [B, 3, S, S] -> [B, (S/p)^2, dim].

    `pos_embed` only sets the initial value of the (always trainable) position embedding: 'learned' = small random
    (std 0.02), 'sincos' = `sincos_grid`."""

    def __init__(self, image_size: int, patch_size: int, dim: int, pos_embed: str = 'learned'):
        super().__init__()
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f'vision.pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}')
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        grid = image_size // patch_size
        init = sincos_grid(grid, dim)[None] if pos_embed == 'sincos' else torch.randn(1, grid * grid, dim) * 0.02
        self.pos = nn.Parameter(init)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.out_dim = dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixels)  # [B, dim, S/p, S/p]
        x = x.flatten(2).transpose(1, 2) + self.pos  # [B, dim, N] -> [B, N, dim]
        return x + self.mlp(self.norm(x))


class HFVisionEncoder(nn.Module):
    """Wraps an HF vision tower (e.g. SiglipVisionModel) built from a config dict or a local folder."""

    def __init__(self, spec: dict):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if spec.get('path'):
            self.model = AutoModel.from_pretrained(spec['path'], local_files_only=True)
        else:
            cfg = dict(spec['config'])
            cfg = AutoConfig.for_model(cfg.pop('model_type'), **cfg)
            self.model = AutoModel.from_config(cfg)
        if hasattr(self.model, 'vision_model'):  # full CLIP/SigLIP models: keep only the tower
            self.model = self.model.vision_model
        self.out_dim = int(getattr(self.model.config, 'hidden_size'))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state  # [B, N, hidden]


def build_vision_encoder(spec: dict, image_size: int) -> nn.Module:
    if spec.get('type', 'patch') == 'patch':
        return PatchEncoder(image_size, int(spec['patch_size']), int(spec['dim']), spec.get('pos_embed', 'learned'))
    return HFVisionEncoder(spec)
