"""The two graphs the runtime calls, and the small tables it applies itself (batch 1).

The torch engine runs these modules directly and the exporter traces the same modules to ONNX, so torch and
ONNX Runtime / TensorRT compute the same thing by construction. Each weight lives in exactly one of them:

    vision:    pixels [1, 3, S, S]                                  -> image_tokens [1, Ni, hidden]
               (vision tower + projector)
    backbone:  embeds [1, n, hidden], positions [1, n] ([3, 1, n] with M-RoPE), mask [K, 1, n, past + n] bool,
               logit_rows [m] int64 (which of the n rows get logits), past_key_i, past_value_i
               [1, kv_heads, past, head_dim] for every layer i (past: T_max or fewer)
                                                                    -> logits [1, m, n_bins],
                                                                       new_kv [layers, 2, kv_heads, n, head_dim]
               (the HF decoder layers + final norm + the action head; n and m are dynamic)
    tables:    text_embed [vocab, hidden], action_embed [n_bins + 1, hidden] (bins + [MASK]),
               state_proj.weight [hidden, S], state_proj.bias [hidden]   (`tables(policy)`; numpy on the runtime)

One backbone graph serves every pass: the prefill (n = P, or the instruction and the observation as two calls),
refine passes (n = B), the fused commit + refine pass (n = 2B), AR (n = 1) and full diffusion (n = L). The mask
(True = attend; built by `runtime.pass_masks`) says what each new token sees of the cache and of the pass; the
cache is read in place through per-layer inputs (`model.split_attention`), never copied, and the runtime writes
the committed slots of `new_kv` into it. K = 1, or one mask row per sliding window of the backbone
(`config.attention_windows`: [None, W] gives full-attention layers row 0 and windowed layers row 1).
Most rows of most passes need only their K/V, not their logits (a prefill reads the last row's logits, a fused
commit the block's and the last committed token's): the last decoder layer computes its attention output, output
projection and MLP, and the head its logits, for the `logit_rows` only (`last_layer_rows`); every row's K/V is
computed as before, and the rows that are computed are computed exactly as without the selection.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .attention_windows import for_layers
from .policy import BlockVLAPolicy
from .split_attention import SplitCache, use_split_attention

TABLES = ('text_embed', 'action_embed', 'state_proj.weight', 'state_proj.bias')


def past_inputs(kv) -> list:
    """A [layers, 2, kv_heads, T, head_dim] cache -> [k_0, v_0, k_1, ...] views [1, kv_heads, T, head_dim]."""
    return [kv[i, j][None] for i in range(kv.shape[0]) for j in (0, 1)]


def past_names(layers: int) -> list:
    return [f'past_{w}_{i}' for i in range(layers) for w in ('key', 'value')]


class VisionGraph(nn.Module):
    def __init__(self, policy: BlockVLAPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.policy.encode_image(pixels)


class BackboneGraph(nn.Module):
    def __init__(self, policy: BlockVLAPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, embeds, positions, mask, logit_rows, past: list):
        """logit_rows: int64 [m] row indices (None: every row, m = n)."""
        windows = self.policy.config.attention_windows
        cache = SplitCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)], windows, logit_rows)
        masks = [mask[i:i + 1] for i in range(max(len(windows), 1))]  # [K, 1, n, T+n] -> K x [1, 1, n, T+n]
        with use_split_attention(self.policy.llm), last_layer_rows(self.policy.llm, logit_rows, embeds.shape[1]):
            out = self.policy.llm(inputs_embeds=embeds, attention_mask=for_layers(masks, windows),
                                  position_ids=positions, past_key_values=cache, use_cache=True, split_cache=cache)
        hidden = out.last_hidden_state  # [1, n, hidden]
        if logit_rows is not None:
            hidden = hidden.index_select(1, logit_rows)  # [1, m, hidden]
        return self.policy.action_logits(hidden), cache.new_kv()


@contextlib.contextmanager
def last_layer_rows(llm, rows, n):
    """Inside the block, the last decoder layer's output projection and MLP compute only `rows` (int64 [m]) of their
    [1, n, hidden] input; the other rows' outputs are zeros (nothing reads them: only `rows` reach the head, and the
    layer's K/V are computed before). A backbone without `layers[-1].mlp` / `.self_attn.o_proj` computes every row."""
    layers = getattr(llm, 'layers', None)
    last = layers[-1] if rows is not None and isinstance(layers, nn.ModuleList) and len(layers) else None
    targets = [m for m in (getattr(last, 'mlp', None), getattr(getattr(last, 'self_attn', None), 'o_proj', None))
               if isinstance(m, nn.Module)]

    def gather(module, args):  # [1, n, c] -> [1, m, c]
        return (args[0].index_select(1, rows),) + tuple(args[1:])

    def scatter(module, args, out):  # [1, m, c] -> [1, n, c], zeros elsewhere
        first = out[0] if isinstance(out, tuple) else out
        full = first.new_zeros(first.shape[0], n, first.shape[2]).index_copy(1, rows, first)
        return (full,) + tuple(out[1:]) if isinstance(out, tuple) else full

    handles = [h for m in targets for h in (m.register_forward_pre_hook(gather), m.register_forward_hook(scatter))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def tables(policy: BlockVLAPolicy) -> dict:
    """The small tables as float32 CPU tensors (views of the parameters where possible)."""
    emb = policy.llm.get_input_embeddings()
    if type(emb) is nn.Embedding:
        text = emb.weight
    else:  # e.g. a scaled embedding: store what the module computes
        vocab = emb.weight.shape[0]
        text = torch.cat([emb(torch.arange(i, min(i + 8192, vocab), device=emb.weight.device))
                          for i in range(0, vocab, 8192)])
    out = {'text_embed': text, 'action_embed': policy.action_embed.weight}
    if policy.state_proj is not None:
        out['state_proj.weight'] = policy.state_proj.weight
        out['state_proj.bias'] = policy.state_proj.bias
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}
