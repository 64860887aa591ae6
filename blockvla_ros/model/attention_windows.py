"""Sliding-window attention: which window each backbone layer applies, and the per-layer masks HF takes.

The policy hands the backbone its own 4-D masks, and HF then applies them as they are: a layer's sliding window
(Mistral, Qwen2 with `use_sliding_window`, Gemma2/3's alternating `sliding_attention` layers; Gemma3's local
rotary base on its sliding layers is the model's own) only takes effect if
the mask carries it. So every mask the policy builds (training: `model.masks`; each runtime pass:
`runtime.pass_masks`) comes as one row per distinct window, `config.attention_windows` (resolved here when the
policy is built, saved with it):

    []          no window shorter than the sequence: one mask (the graph as without windows)
    [W]         every layer slides over W positions (Mistral): one mask, windowed
    [None, W]   full-attention layers and W-windowed ones (Gemma2, Qwen2 past max_window_layers): two masks, given
                to HF as {'full_attention': row 0, 'sliding_attention': row 1} (its `layer_types` pick one per layer)

A window counts positions, as HF's counts tokens of an unpadded sequence: a query at position q sees keys at
positions > q - W (`model.masks.window_rule`). Both action copies of the training sequence share positions, so the
training mask and the cached passes apply the same window. A window no longer than the sequence (T_max) is applied;
a longer one never binds and is dropped. Refused when the policy is built (the key named): layer types other than
full / sliding attention, a binding window with M-RoPE positions (3-D: no single distance), and a binding window on a
bidirectional backbone (`use_bidirectional_attention`: two-sided windows; without a binding window the flag is
harmless, since the policy's own masks replace the backbone's, as for PaliGemma's text model).
"""
from __future__ import annotations

from typing import Optional

LAYER_TYPES = ('full_attention', 'sliding_attention')  # the layer types whose masks the policy builds


def layer_windows(hf_config) -> list:
    """The window of each layer as the HF model applies it (None: full attention)."""
    window = getattr(hf_config, 'sliding_window', None)
    types = getattr(hf_config, 'layer_types', None)
    if types is None:  # Mistral, Mixtral, Phi3, Starcoder2: one window (or none) for every layer
        return [window] * hf_config.num_hidden_layers
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f'backbone.layer_types: {", ".join(map(repr, unknown))} attention is not supported (only '
                         f'{" / ".join(LAYER_TYPES)} layers); use a backbone without it')
    return [window if t == 'sliding_attention' else None for t in types]


def mask_windows(hf_config, max_seq_len: int, rope_dims: int = 1) -> list:
    """`config.attention_windows` of a backbone: the windows that bind on a `max_seq_len` sequence (module doc)."""
    per_layer = [w if w is not None and w < max_seq_len else None for w in layer_windows(hf_config)]
    binding = sorted(set(per_layer) - {None})
    if not binding:
        return []
    if getattr(hf_config, 'use_bidirectional_attention', False):  # PaliGemma's text model: no binding window, fine
        raise ValueError(f'backbone.use_bidirectional_attention with a sliding window ({binding[0]}) shorter than the '
                         f'policy sequence ({max_seq_len} tokens): a bidirectional backbone\'s windows are two-sided, '
                         'the policy\'s masks apply one-sided windows. Use a causal backbone or a window >= the '
                         'sequence')
    if len(binding) > 1:  # HF configs have one sliding_window; a second value would need a third mask kind
        raise ValueError(f'backbone.sliding_window: layers use windows {binding}; one window is supported')
    if rope_dims != 1:
        raise ValueError(f'backbone.sliding_window {binding[0]} is shorter than the policy sequence ({max_seq_len} '
                         f'tokens) and the positions are M-RoPE ({rope_dims}-D): no distance to apply the window '
                         'by; set sliding_window >= the sequence or use a backbone without windows')
    # a model without layer_types gives every layer the same window, so [None, W] always comes with layer_types
    return binding if None not in per_layer else [None] + binding


def for_layers(rows: list, windows: list):
    """Masks, one per entry of `windows` (or one when there are none) -> what the HF model's `attention_mask` takes:
    the mask itself, or {'full_attention': ..., 'sliding_attention': ...} (the model picks per layer type)."""
    if len(rows) == 1:
        return rows[0]
    return {('full_attention' if w is None else 'sliding_attention'): m for w, m in zip(windows, rows)}


def check_windows(windows, where: str = 'attention_windows') -> Optional[str]:
    """An error message for a malformed `attention_windows`, or None."""
    if not isinstance(windows, list) or len(windows) > 2:
        return f'{where} must be a list of at most 2 entries, got {windows!r}'
    ok = lambda w: isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 1 << 24  # noqa: E731
    if windows and not (ok(windows[-1]) and (len(windows) == 1 or windows[0] is None)):
        return f'{where} must be [], [W] or [None, W] with W a positive window, got {windows!r}'
    return None
