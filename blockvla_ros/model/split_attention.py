"""Attention over [cache ; new tokens] without concatenating the cache: a transformers attention function.

Every decode pass evaluates n new tokens against a preallocated cache of T_max slots. HF attention normally
appends the new K/V to the cache (a copy of the whole cache per layer per pass, in an exported graph) and, for
grouped-query attention, repeats K/V per query head (another copy). Here the scores against the cache and against
the new tokens are computed separately, normalized by one softmax over both, and the two weighted sums added:

    q [1, H, n, d] viewed as [1, Hkv, g*n, d]   (g = H / Hkv query heads per K/V head; no K/V repeat)
    s_cache = q @ K_cache^T * scale   [1, Hkv, g*n, T_max]     s_new = q @ K_new^T * scale   [1, Hkv, g*n, n]
    (softcap: s = tanh(s / c) * c)    masked with mask[..., :T_max] / mask[..., T_max:]   (True = attend)
    p = softmax([s_cache ; s_new])    out = p_cache @ V_cache + p_new @ V_new

The HF model code is unmodified: `SplitCache` is a `Cache` whose `update()` keeps each layer's new K/V (the
pass's `new_kv` output) and returns only them, and `split_attention` (registered as ``blockvla_split``) reads the
layer's past K/V from it. The module's own `scaling` and logit softcapping are honoured (Gemma2); a sliding window
is applied by the layer's mask (`model.attention_windows`: the runtime builds one mask per window); a layer whose
window is shorter than the cache and that no mask row applies is refused. `use_split_attention(model)` switches a
model to this function for one block of code (the graphs in `model.graphs` run inside it; training keeps its own
setting).
"""
from __future__ import annotations

import contextlib

import torch

NAME = 'blockvla_split'


def _cache_base():
    try:
        from transformers.cache_utils import Cache
    except ImportError as e:  # pragma: no cover - transformers is a dependency of model/
        raise ImportError('split attention needs transformers: pip install transformers') from e
    return Cache


class SplitCache(_cache_base()):
    """Past K/V per layer (read only, [1, kv_heads, T_max, head_dim] each) + the new K/V each layer produces.

    `rows` (int64 [m], optional): the only query rows whose output is read after the last layer (the rows whose logits
    a pass returns); the last layer's attention then scores only those queries (`model.graphs.last_layer_rows`
    does the same for its output projection and MLP). Every row's K/V is still computed by every layer."""

    def __init__(self, past: list, windows=(), rows=None):
        super().__init__(layers=[])
        self.past = list(past)  # [(k, v)] per layer
        self.windows = set(windows) - {None}  # the sliding windows the masks of this pass apply
        self.new = [None] * len(self.past)
        self.rows = rows

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        self.new[layer_idx] = (key_states, value_states)
        return key_states, value_states  # attention reads the past itself: nothing is concatenated

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.past[0][0].shape[2])

    def new_kv(self) -> torch.Tensor:
        """-> [layers, 2, kv_heads, n, head_dim] (batch 1 dropped)."""
        missing = [i for i, kv in enumerate(self.new) if kv is None]
        if missing:
            raise RuntimeError(f'layers {missing} did not update the split cache (not a standard attention layer?)')
        return torch.stack([torch.stack([k[0], v[0]]) for k, v in self.new])


def split_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, softcap=None,
                    sliding_window=None, split_cache: SplitCache = None, **kwargs):
    """The attention interface (module, q, k, v, mask, ...) -> (out [1, n, H, d], None); see the module doc."""
    if split_cache is None:
        raise RuntimeError(f"attn_implementation '{NAME}' needs the past K/V: run the backbone through "
                           'blockvla_ros.model.graphs.BackboneGraph')
    past_k, past_v = split_cache.past[module.layer_idx]  # [1, Hkv, T, d] each
    b, h, n, d = query.shape
    kvh, t_max = key.shape[1], past_k.shape[2]
    # the window test first: t_max is the traced (dynamic) past length, compared only when no mask applies the window
    if sliding_window is not None and sliding_window not in split_cache.windows and t_max > sliding_window:
        raise ValueError(f'layer {module.layer_idx} uses a sliding window of {sliding_window} tokens, shorter than '
                         f'the policy sequence ({t_max}), and no mask applies it: the policy config\'s '
                         f'attention_windows {sorted(split_cache.windows)} do not match its backbone; rebuild the '
                         'policy')
    n_new = n  # the pass's own keys (every token's K/V)
    rows = split_cache.rows if module.layer_idx == len(split_cache.past) - 1 else None
    if rows is not None:  # the last layer: only the m queries whose output is read (query [1, H, m, d])
        query, attention_mask, n = query.index_select(2, rows), attention_mask.index_select(2, rows), rows.shape[0]
    g = h // kvh
    scale = float(scaling) if scaling is not None else d ** -0.5
    q = query.reshape(b, kvh, g * n, d)  # [1, H, n, d] -> [1, Hkv, g*n, d]: head h uses K/V head h // g
    s_cache = torch.matmul(q, past_k.transpose(-1, -2)).float() * scale  # [1, Hkv, g*n, T]
    s_new = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [1, Hkv, g*n, n_new]
    if softcap is not None:
        s_cache = torch.tanh(s_cache / softcap) * softcap
        s_new = torch.tanh(s_new / softcap) * softcap
    scores = torch.cat([s_cache.view(b, kvh, g, n, t_max), s_new.view(b, kvh, g, n, n_new)], -1)  # [.., n, T+n_new]
    allowed = attention_mask[:, :, None]  # [1, 1, n, T+n_new] -> [1, 1, 1, n, T+n_new]
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(torch.float32).min), -1).to(query.dtype)
    probs = probs.view(b, kvh, g * n, t_max + n_new)
    out = torch.matmul(probs[..., :t_max], past_v) + torch.matmul(probs[..., t_max:], value)  # [1, Hkv, g*n, d]
    out = out.view(b, h, n, d).transpose(1, 2)  # -> [1, n, H, d]
    if rows is not None:  # back to every row, zeros where nothing reads them: [1, m, H, d] -> [1, n_new, H, d]
        out = out.new_zeros(b, n_new, h, d).index_copy(1, rows, out)
    return out.contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, split_attention)


@contextlib.contextmanager
def use_split_attention(model):
    """Run `model` (and its sub-models) with split attention inside the block; the previous setting is restored."""
    register()
    configs = {id(c): c for m in model.modules() if (c := getattr(m, 'config', None)) is not None
               and hasattr(c, '_attn_implementation')}
    previous = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = NAME
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = previous[k]
