"""The prefix layout of a policy: one home, pure numpy (no torch), read by the torch model and the numpy runtime.

The layout type is `model.vlm.layout.PromptLayout`: ordered named segments with a static length and a source
('text' = the left-padded instruction slot, 'image' = the vision tokens, 'state' = the state projection, 'fixed' =
template token ids known at export, `ids`), segments sharing a `span` attending bidirectionally (PaliGemma's
prefix-LM), 1-D or 3-D (Qwen2-VL M-RoPE) positions. A VLM family builds its own from the pretrained prompt format
(model.vlm.load; saved in the config as `vlm_layout`); every other policy gets the layout of its config from
`layout_for` (text first by default):

    text_first, Lt = 5 slot tokens (left-padded), 4 image tokens, a state token:

        slot      0   1   2   3   4 | 5   6   7   8 | 9
        segment   text              | image         | state
        valid     .   .   x   x   x | x   x   x   x | x
        position  0   0   0   1   2 | 3   4   5   6 | 7        (actions continue at 8 = valid tokens)
        attention causal over valid keys; a padding key is seen by itself only

The contract the engines, the training masks and the exporter rely on (all methods of PromptLayout):

- `valid(text_valid) -> [..., P]`: which prefix slots hold a real token (only the text slot can be padding).
- `positions(valid) -> [..., P]` position ids (padding gets 0); with `rope_dims == 3` `[3, ..., P]`, and the backbone
  graph's `positions` input is `[3, 1, n]` instead of `[1, n]` (`graph_positions`).
- `next_position(valid)`, `action_positions(valid, first, n)`: action tokens continue after the prefix (every
  action copy; with M-RoPE all three components carry the same value).
- `attention(valid) -> [..., P, P]` bool (query, key; True = attend): causal over valid keys plus the spans; every
  query sees itself. The prefix pattern of training and of every prefill pass (`runtime.pass_masks`).
- `instruction_len`: leading slots that depend on the instruction (and fixed template ids) alone; their K/V is
  computed once and kept while the instruction does not change. 0 when an image or state token comes first or a
  span joins the text to them.
- `to_dict()` is what policy.yaml records as `prefix`; the loader checks it against `layout_for(config)`.
"""
from __future__ import annotations

import numpy as np

from .vlm.layout import PromptLayout, Segment

__all__ = ['PromptLayout', 'Segment', 'layout_for', 'generic_layout', 'graph_positions']


def layout_for(config) -> PromptLayout:
    """The layout of a BlockVLAConfig: a VLM's resolved prompt layout, else the instruction slot (max_text_tokens)
    and the image in `prefix_order`, then a state token when the policy reads one."""
    if config.is_vlm:
        return PromptLayout.from_dict(config.vlm_layout)
    text = Segment('text', config.max_text_tokens, 'text')
    image = Segment('image', config.n_image_tokens, 'image')
    segments = [text, image] if config.prefix_order == 'text_first' else [image, text]
    if config.state_dim:
        segments.append(Segment('state', 1, 'state'))
    return PromptLayout(segments=tuple(segments))


def generic_layout(prefix_len: int) -> PromptLayout:
    """A plain causal prefix of `prefix_len` slots whose validity the caller gives slot by slot (tests, masks
    without a policy): the layout rules need one text and one image segment, so the last slot is the image's."""
    return PromptLayout(segments=(Segment('text', prefix_len - 1, 'text'), Segment('image', 1, 'image')))


def graph_positions(positions: np.ndarray) -> np.ndarray:
    """Positions [n] (or [3, n] with M-RoPE) -> the backbone graph's `positions` input [1, n] (or [3, 1, n])."""
    return np.asarray(positions, dtype=np.int64)[..., None, :]
