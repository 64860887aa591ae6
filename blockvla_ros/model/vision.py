"""Vision encoders: a small built-in patch encoder (default) or any HF vision model (SigLIP, CLIP) by config."""
from __future__ import annotations

import torch
from torch import nn


class PatchEncoder(nn.Module):
    """ViT-style patchify + one pre-norm MLP mixer layer: [B, 3, S, S] -> [B, (S/p)^2, dim]."""

    def __init__(self, image_size: int, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        n = (image_size // patch_size) ** 2
        self.pos = nn.Parameter(torch.randn(1, n, dim) * 0.02)
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
        return PatchEncoder(image_size, int(spec['patch_size']), int(spec['dim']))
    return HFVisionEncoder(spec)
