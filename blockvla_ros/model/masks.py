"""Attention masks (bool, True = may attend) over [prefix][action tokens], for training and for every decode pass.

Every action token carries a kind (NOISY action copy, CLEAN action copy) and a block id (counted from the start of
the action region). The prefix rows and columns come from the prefix layout (`model.prefix_layout`: causal over
valid tokens unless a VLM family says otherwise); the action rules are `action_rule`, one vectorized rule set for
all three training modes and for the decode passes (`runtime.pass_masks` builds those from the same functions); a
backbone's sliding window is `window_rule`, applied to every mask over positions (`model.attention_windows`):

    blockdiff (teacher forcing), P=3 prefix, L=4 actions, B=2 -> noisy blocks n0 n1, clean blocks c0 c1

                  keys:  p p p | n0 n0 n1 n1 | c0 c0 c1 c1
        p               x . .    .  .  .  .    .  .  .  .      prefix: the layout's pattern (causal over valid
        p               x x .    .  .  .  .    .  .  .  .      prefix), never sees actions
        p               x x x    .  .  .  .    .  .  .  .
        n0              x x x    x  x  .  .    .  .  .  .      noisy block b: itself (bidirectional)
        n0              x x x    x  x  .  .    .  .  .  .      + clean blocks < b
        n1              x x x    .  .  x  x    x  x  .  .
        n1              x x x    .  .  x  x    x  x  .  .
        c0              x x x    .  .  .  .    x  x  .  .      clean block b: clean blocks <= b
        c0              x x x    .  .  .  .    x  x  .  .
        c1              x x x    .  .  .  .    x  x  x  x
        c1              x x x    .  .  .  .    x  x  x  x

    ar:       prefix + a CLEAN copy with block size 1 (plain causal attention).
    fulldiff: prefix + a NOISY copy that is one block (bidirectional over all actions).

Every action token sees every valid prefix token. The rules are numpy (the runtime imports this module without
torch); `training_mask`, `decoding_reference_mask`, `windowed` and `position_ids` wrap them for torch callers.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .prefix_layout import PromptLayout, generic_layout

PREFIX, NOISY, CLEAN = 0, 1, 2


def action_rule(q_kind, q_block, k_kind, k_block) -> np.ndarray:
    """Action queries x action keys: kinds/blocks [Q] and [K] int -> [Q, K] bool (see the module picture)."""
    qk, kk = np.asarray(q_kind)[:, None], np.asarray(k_kind)[None, :]
    qb, kb = np.asarray(q_block)[:, None], np.asarray(k_block)[None, :]
    clean_q = (qk == CLEAN) & (kk == CLEAN) & (kb <= qb)
    noisy_q_clean_k = (qk == NOISY) & (kk == CLEAN) & (kb < qb)
    noisy_q_noisy_k = (qk == NOISY) & (kk == NOISY) & (kb == qb)
    return clean_q | noisy_q_clean_k | noisy_q_noisy_k


def window_rule(q_pos, k_pos, window: int):
    """What a sliding window of `window` positions lets queries see: keys at positions > query - window (keys after
    the query, inside a bidirectional block, stay visible). positions [..., Q], [..., K] (numpy or torch)
    -> [..., Q, K] bool."""
    return (q_pos[..., :, None] - k_pos[..., None, :]) < window


def action_layout(n_actions: int, block_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Kinds and block ids [A] of the action tokens of the training sequence for `mode`."""
    a = np.arange(n_actions)
    if mode == 'blockdiff':
        return (np.concatenate([np.full(n_actions, NOISY), np.full(n_actions, CLEAN)]),
                np.concatenate([a // block_size, a // block_size]))
    if mode == 'ar':
        return np.full(n_actions, CLEAN), a
    if mode == 'fulldiff':
        return np.full(n_actions, NOISY), np.zeros(n_actions, dtype=np.int64)
    raise ValueError(f'unknown mask mode {mode!r}')


def sequence_mask(layout: PromptLayout, prefix_valid: np.ndarray, kind, block) -> np.ndarray:
    """[prefix][actions with kind/block [A]]: prefix_valid [N, P] -> [N, T, T] bool, T = P + A."""
    prefix_valid = np.asarray(prefix_valid, dtype=bool)
    p, a = layout.length, len(kind)
    out = np.zeros(prefix_valid.shape[:-1] + (p + a, p + a), dtype=bool)
    out[..., :p, :p] = layout.attention(prefix_valid)
    out[..., p:, :p] = prefix_valid[..., None, :]
    out[..., p:, p:] = action_rule(kind, block, kind, block)
    return out


# --- torch wrappers (training, the uncached reference) ----------------------------------------------------------
def _numpy(prefix_valid, prefix_layout):
    """(layout, prefix validity [N, P] as numpy) for a torch validity tensor; no layout: a plain causal prefix."""
    valid = prefix_valid.detach().cpu().numpy().astype(bool)
    layout = prefix_layout if prefix_layout is not None else generic_layout(valid.shape[-1])
    if layout.length != valid.shape[-1]:
        raise ValueError(f'prefix has {valid.shape[-1]} slots, the layout {layout.length}')
    return layout, valid


def _torch_like(array: np.ndarray, like):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(like.device)


def training_mask(prefix_valid, n_actions: int, block_size: int, mode: str,
                  prefix_layout: Optional[PromptLayout] = None):
    """prefix_valid [N, P] bool tensor -> mask [N, 1, T, T] for the training sequence of `mode`."""
    layout, valid = _numpy(prefix_valid, prefix_layout)
    kind, block = action_layout(n_actions, block_size, mode)
    return _torch_like(sequence_mask(layout, valid, kind, block)[:, None], prefix_valid)


def decoding_reference_mask(prefix_valid, n_committed: int, n_current: int, block_size: int,
                            prefix_layout: Optional[PromptLayout] = None):
    """Mask of one uncached forward over [prefix][committed clean blocks][current noisy block].

    This is what block-diffusion decoding with a KV cache computes implicitly: the committed blocks are the clean
    copy (block-causal) and the block being refined sees the prefix, every committed block and itself.
    prefix_valid [N, P] -> [N, 1, T, T] with T = P + n_committed + n_current.
    """
    layout, valid = _numpy(prefix_valid, prefix_layout)
    kind = np.concatenate([np.full(n_committed, CLEAN), np.full(n_current, NOISY)])
    block = np.concatenate([np.arange(n_committed) // block_size,
                            np.full(n_current, n_committed // block_size)])
    return _torch_like(sequence_mask(layout, valid, kind, block)[:, None], prefix_valid)


def windowed(mask, positions, windows: list) -> list:
    """One uncached forward's mask [N, 1, T, T] and positions [N, T] -> one mask per entry of `windows` (None: the
    mask; W: also `window_rule`), or [mask] without windows (model.attention_windows)."""
    if not windows:
        return [mask]
    if positions.dim() != 2:
        raise ValueError('sliding windows need 1-D positions [N, T]')
    return [mask if w is None else mask & window_rule(positions, positions, w)[:, None] for w in windows]


def position_ids(prefix_valid, n_actions: int, copies: int, prefix_layout: Optional[PromptLayout] = None):
    """Positions of [prefix][copies x actions]: the layout's prefix positions, every copy continues after it.

    prefix_valid [N, P] -> [N, P + copies * n_actions] (or [3, N, ...] with M-RoPE).
    """
    layout, valid = _numpy(prefix_valid, prefix_layout)
    prefix = layout.positions(valid)  # [N, P] (or [3, N, P])
    act = layout.next_position(valid)[:, None] + np.arange(n_actions)  # [N, L]
    act = np.broadcast_to(act, prefix.shape[:-1] + act.shape[-1:])
    return _torch_like(np.concatenate([prefix] + [act] * copies, axis=-1), prefix_valid)
