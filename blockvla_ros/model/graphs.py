"""The three static-shape graphs the runtime calls: vision, prefill, step (batch 1).

The torch engine runs these modules directly and the exporter traces the same modules to ONNX, so torch and
ONNX Runtime / TensorRT compute the same thing by construction.

    vision:  pixels [1, 3, S, S]                                   -> image_tokens [1, Ni, hidden]
    prefill: text_ids [1, Lt], text_valid [1, Lt], image_tokens,
             (state [1, S])                                        -> logits [1, n_bins] (last prefix position),
                                                                      kv [layers, 2, kv_heads, P, head_dim]
    step:    tokens [1, n], positions [1, n],
             kv [layers, 2, kv_heads, T_max, head_dim],
             kv_valid [1, T_max] bool                              -> logits [1, n, n_bins],
                                                                      new_kv [layers, 2, kv_heads, n, head_dim]

The step's n tokens see every valid cache slot and each other (bidirectional inside the step): a block being
refined (n = B), a commit pass (n = B), one AR token (n = 1) or the whole chunk (n = L, full diffusion).
"""
from __future__ import annotations

import torch
from torch import nn

from .masks import position_ids, training_mask
from .policy import BlockVLAPolicy


def _stack_cache(cache, start: int = 0) -> torch.Tensor:
    """DynamicCache -> [layers, 2, kv_heads, T - start, head_dim] (batch 1 dropped)."""
    return torch.stack([torch.stack([layer.keys[0, :, start:], layer.values[0, :, start:]]) for layer in cache.layers])


def _cache_from(kv: torch.Tensor):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(kv[i, 0][None], kv[i, 1][None]) for i in range(kv.shape[0])])


class VisionGraph(nn.Module):
    def __init__(self, policy: BlockVLAPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.policy.encode_image(pixels)


class PrefillGraph(nn.Module):
    def __init__(self, policy: BlockVLAPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, text_ids, text_valid, image_tokens, state=None):
        from transformers import DynamicCache

        embeds, valid = self.policy.embed_prefix(text_ids, text_valid, image_tokens, state)  # [1, P, h], [1, P]
        layout = self.policy.layout  # a VLM's prompt (its prefix attention and positions), else None: causal
        mask = training_mask(valid, 0, 1, 'ar', layout)  # prefix only: causal over valid tokens
        hidden, cache = self.policy.run_backbone(embeds, position_ids(valid, 0, 0, layout), mask, DynamicCache())
        logits = self.policy.action_logits(hidden[:, -1])  # [1, n_bins]
        return logits, _stack_cache(cache)


class StepGraph(nn.Module):
    def __init__(self, policy: BlockVLAPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, tokens, positions, kv, kv_valid):
        n, t_max = tokens.shape[1], kv.shape[3]
        embeds = self.policy.action_embed(tokens)  # [1, n, hidden]
        mask = torch.cat([kv_valid[:, None, None, :].expand(1, 1, n, t_max),
                          torch.ones(1, 1, n, n, dtype=torch.bool, device=kv.device)], dim=-1)  # [1, 1, n, T+n]
        hidden, cache = self.policy.run_backbone(embeds, positions, mask, _cache_from(kv))
        return self.policy.action_logits(hidden), _stack_cache(cache, t_max)
