"""The attention mask of every backbone pass, built here and nowhere else: [1, 1, n, past + n] bool, True = attend.

Columns 0 .. past-1 are the cache slots the pass reads (past = T_max: the whole cache; a backend that can bind fewer
slots reads only the `lo` slots before a prefix pass, at least one), columns past .. past+n-1 the pass's own n
tokens. The rules come from `model.prefix_layout` (the prefix pattern) and `model.masks.action_rule` (the action
blocks), the same functions the training mask is built from, so a cached decode attends exactly like one uncached
forward over the sequence.

    prefix pass over prefix slots [lo, hi)         rows: the layout's attention rows lo .. hi-1
        (one-call prefill: lo = 0, hi = P;         cache columns 0 .. lo-1: those rows over the slots already cached
                                                   (columns lo .. past-1: never attended)
         split prefill: the instruction [0, Lt),   own columns: the pattern among the pass's tokens
         then the observation [Lt, P))

    action pass: `commit` clean tokens (finished blocks, written to the cache after the pass), then the n - commit
    noisy tokens of the block being refined (e.g. B = 2, commit = 2: block b-1 clean, block b noisy)

                    cache slots (valid ones)   c c   n n
        c (b-1)     x x x ... x                x x   . .      clean: block-causal, never sees noisy tokens
        c (b-1)     x x x ... x                x x   . .
        n (b)       x x x ... x                x x   x x      noisy: the clean tokens of the pass + its block
        n (b)       x x x ... x                x x   x x

    prefix pass + first action pass in one (`prefix_action_mask`: the prefill folded into the first refine pass):
    [prefix slots lo .. P-1 ; n action tokens at indices 0 .. n-1], past cache slots read

                    cache 0..lo-1   prefix lo..P-1   c   n n
        prefix      as prefix_mask                   .   . .      the prefix never sees an action token
        c / n       valid[:lo]      valid[lo:]       action_rule   as action_mask over a cache holding the prefix

    sliding windows (`config.attention_windows`, model.attention_windows): `windowed` stacks one mask per window,
    [K, 1, n, past + n]; a windowed row also drops keys W or more positions behind the query (the cache slots'
    positions are the KV cache's `positions`). Without windows, K = 1 and the mask is unchanged.
"""
from __future__ import annotations

import numpy as np

from ..model.masks import CLEAN, NOISY, action_rule, window_rule


def prefix_mask(attention: np.ndarray, lo: int, hi: int, past: int) -> np.ndarray:
    """attention [P, P] (the layout's pattern for this prefix) -> the mask of the pass over prefix slots [lo, hi)
    reading `past` >= lo cache slots."""
    if past < lo:
        raise ValueError(f'a prefix pass from slot {lo} must read at least {lo} cache slots, not {past}')
    n = hi - lo
    mask = np.zeros((1, 1, n, past + n), dtype=bool)
    mask[0, 0, :, :lo] = attention[lo:hi, :lo]
    mask[0, 0, :, past:] = attention[lo:hi, lo:hi]
    return mask


def action_mask(cache_valid: np.ndarray, first: int, commit: int, n: int, block_size: int) -> np.ndarray:
    """The mask of an action pass: n tokens at action indices first .. first+n-1, the first `commit` of them clean
    (blocks of `block_size`: 1 for AR), the rest one noisy block. cache_valid [T_max] bool."""
    t_max = cache_valid.shape[-1]
    if not 0 <= commit <= n:
        raise ValueError(f'commit must be in [0, {n}], got {commit}')
    clean_blocks = (first + np.arange(commit)) // block_size
    kind = np.concatenate([np.full(commit, CLEAN), np.full(n - commit, NOISY)])
    block = np.concatenate([clean_blocks, np.full(n - commit, clean_blocks[-1] + 1 if commit else 0)])
    mask = np.empty((1, 1, n, t_max + n), dtype=bool)
    mask[0, 0, :, :t_max] = cache_valid.reshape(1, t_max)
    mask[0, 0, :, t_max:] = action_rule(kind, block, kind, block)
    return mask


def prefix_action_mask(attention: np.ndarray, valid: np.ndarray, lo: int, past: int, commit: int, n: int,
                       block_size: int) -> np.ndarray:
    """The mask of one pass over prefix slots [lo, P) followed by the first n action tokens (the first `commit`
    clean): the prefix rows are `prefix_mask`'s (blind to the actions), the action rows `action_mask`'s over a cache
    whose slots 0 .. P-1 hold the prefix (valid [P]): slots before lo from the cache, the rest the pass's own
    columns. -> [1, 1, P - lo + n, past + P - lo + n]"""
    P = attention.shape[0]
    n_p = P - lo
    mask = np.zeros((1, 1, n_p + n, past + n_p + n), dtype=bool)
    mask[:, :, :n_p, :past + n_p] = prefix_mask(attention, lo, P, past)
    seen = np.zeros(past + n_p, dtype=bool)  # what an action row sees left of the actions
    seen[:lo] = valid[:lo]
    seen[past:] = valid[lo:]
    mask[:, :, n_p:] = action_mask(seen, 0, commit, n, block_size)
    return mask


def windowed(mask: np.ndarray, q_pos: np.ndarray, slot_pos: np.ndarray, windows: list) -> np.ndarray:
    """mask [1, 1, n, past + n], query positions [n], the positions of the cache slots it reads [past] ->
    [K, 1, n, past + n]: one row per entry of `windows` (None: the mask; W: within W positions too), the mask itself
    when there are none."""
    if not windows:
        return mask
    window_ok = lambda w: window_rule(q_pos, np.concatenate([slot_pos, q_pos]), w)  # noqa: E731  [n, past + n]
    return np.concatenate([mask if w is None else mask & window_ok(w) for w in windows])
