"""The vision part of each VLM family (its own tower + connector) as one module: pixels -> image tokens.

Each takes the numpy processor's output (`runtime.image_processors`) for a batch and returns the language model's
image embeddings [N, n_image_tokens, hidden], exactly what the HF model's `get_image_features` scatters into the
prompt (tests compare the two). Static shapes only: the one fixed resolution of the policy.
"""
from __future__ import annotations

import torch
from torch import nn


class PaliGemmaVision(nn.Module):
    """SigLIP tower -> linear projector. pixels [N, 3, H, W] -> [N, (H/p)*(W/p), hidden]."""

    def __init__(self, hf_model):
        super().__init__()
        inner = hf_model.model
        self.tower = inner.vision_tower
        self.connector = inner.multi_modal_projector

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.connector(self.tower(pixels).last_hidden_state)


class Idefics3Vision(nn.Module):
    """Idefics3/SmolVLM: SigLIP-style tower over one full (unsplit, unpadded) image -> pixel shuffle + projection.

    The tower's own forward derives patch position ids with `bucketize` from a patch mask; for a full image they
    are simply 0..n-1, so they are a constant here (nothing shape-dependent left for the exporters).
    pixels [N, 3, S, S] -> [N, (S/p)^2 / scale^2, hidden]."""

    def __init__(self, hf_model):
        super().__init__()
        inner = hf_model.model
        self.tower = inner.vision_model
        self.connector = inner.connector
        emb = self.tower.embeddings
        self.register_buffer('position_ids', torch.arange(emb.num_patches)[None], persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        emb = self.tower.embeddings
        x = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [N, C, S/p, S/p] -> [N, n, C]
        x = x + emb.position_embedding(self.position_ids)
        x = self.tower.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state
        return self.connector(self.tower.post_layernorm(x))


class Qwen2VLVision(nn.Module):
    """Qwen2-VL / Qwen2.5-VL vision transformer with its patch merger at one fixed grid.

    pixels [N, gh*gw, 3*tp*p*p] (the processor's flat patches per image) -> [N, gh*gw / merge^2, hidden].
    Its connector (the patch merger) lives inside the tower: `connector_in_tower` names it for freezing."""

    connector_in_tower = ('merger.',)

    def __init__(self, hf_model, grid_thw: tuple):
        super().__init__()
        self.tower = hf_model.model.visual
        self.grid_thw = tuple(int(g) for g in grid_thw)
        merge = int(self.tower.spatial_merge_size)
        self.n_tokens = self.grid_thw[0] * self.grid_thw[1] * self.grid_thw[2] // (merge * merge)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        grid = torch.tensor([self.grid_thw] * n, dtype=torch.long, device=pixels.device)  # [N, 3]
        flat = pixels.reshape(n * pixels.shape[1], pixels.shape[2])  # [N, P, D] -> [N*P, D]
        merged = self.tower(flat, grid_thw=grid).pooler_output  # [N * n_tokens, hidden]
        return merged.reshape(n, self.n_tokens, merged.shape[-1])
