"""The prefill split in two, so an unchanged instruction's K/V is computed once (text-first prefixes only).

    text_prefill: text_ids [1, Lt], text_valid [1, Lt]            -> text_kv [layers, 2, kv_heads, Lt, head_dim]
    obs_prefill:  image_tokens [1, Ni, hidden], text_kv,
                  text_valid, (state [1, S])                       -> logits [1, n_bins] (last prefix position),
                                                                      kv [layers, 2, kv_heads, P - Lt, head_dim]

Together they compute exactly what `model.graphs.PrefillGraph` computes: the text is causal over its valid
tokens (the same mask and positions), and every observation token sees the valid text plus the observation
tokens before it, at positions n_valid_text + i.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.graphs import _cache_from, _stack_cache
from ..model.masks import position_ids, training_mask


class TextPrefillGraph(nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, text_ids, text_valid):
        from transformers import DynamicCache

        embeds = self.policy.llm.get_input_embeddings()(text_ids)  # [1, Lt, hidden]
        mask = training_mask(text_valid, 0, 1, 'ar')  # [1, 1, Lt, Lt]: causal over valid text
        _, cache = self.policy.run_backbone(embeds, position_ids(text_valid, 0, 0), mask, DynamicCache())
        return _stack_cache(cache)


class ObsPrefillGraph(nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, image_tokens, text_kv, text_valid, state=None):
        parts = [image_tokens]
        if self.policy.state_proj is not None:
            parts.append(self.policy.state_proj(state)[:, None])  # [1, S] -> [1, 1, hidden]
        embeds = torch.cat(parts, 1)  # [1, No, hidden]
        no, lt = embeds.shape[1], text_kv.shape[3]
        causal = torch.ones(no, no, dtype=torch.bool, device=embeds.device).tril()
        mask = torch.cat([text_valid[:, None, None, :].expand(1, 1, no, lt), causal[None, None]], -1)  # [1,1,No,Lt+No]
        n_text = text_valid.long().sum(-1, keepdim=True)  # [1, 1]
        positions = n_text + torch.arange(no, device=embeds.device)[None]  # [1, No]
        hidden, cache = self.policy.run_backbone(embeds, positions, mask, _cache_from(text_kv))
        return self.policy.action_logits(hidden[:, -1]), _stack_cache(cache, lt)
