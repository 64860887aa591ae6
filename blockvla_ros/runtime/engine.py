"""The engine interface the decode loop drives, and everything engines share: embeddings, positions, masks, cache.

A backend implements two graph calls on batch 1 and its buffer type:

    _vision(pixels [1, 3, S, S])                     -> image tokens, numpy [1, Ni, hidden]
    _backbone(embeds [1, n, h], positions, mask,     -> (logits numpy [m, n_bins] of those rows (a copy),
              rows int64 [m])                            new_kv [layers, 2, kv_heads, n, head_dim] (backend array))

where the backbone reads the engine's KV cache in place: all T_max slots, or, for a backend with `dynamic_past`
(a graph whose cache inputs have a 'past' dim), only the first past = mask.shape[-1] - n slots. Such a backend reads
only the slots before a prefix pass (at least one): a one-call prefill scores no empty cache slot, an observation
pass only the instruction's. This class does the rest in numpy, once for all
backends: table lookups (`runtime.tables`), the prefix layout (`model.prefix_layout`), every pass mask
(`runtime.pass_masks`; one row per sliding window of `config.attention_windows`, by the positions the cache records)
and writing committed slots into the cache (`runtime.kv_cache`). The decode loop sees:

    prefill(prefix)                       -> logits [n_bins] at the last prefix position
    step(tokens, commit=k, block_size=B)  -> logits [n, n_bins] of the n action tokens after the committed ones;
                                             the first k are clean (finished blocks of B tokens, block-causal)
                                             and their K/V are written to the cache; the rest are one noisy block
                                             that sees them and itself (the fused commit + refine pass)
    step(..., rows=slice(lo, hi))         -> logits [hi - lo, n_bins] of those rows only (or rows=int indices
                                             [m] -> [m, n_bins]): a graph with a `logit_rows` input computes
                                             nothing else after the last layer's K/V (model.graphs); a prefix pass
                                             asks for its last row only
    prefill_step(prefix, tokens, ...)     -> (prefill's logits, step's logits): both in one backbone pass over
                                             [prefix ; tokens] (the decoders fold the prefill into their first
                                             pass: runtime.decoding); the prefix never sees the tokens, the tokens
                                             see the prefix as a step would, and only the prefix's (and the first
                                             k tokens') K/V join the cache

With `reuse_instruction` (a prefix that starts with the instruction) the prefill runs as two backbone calls, the
instruction and then the observation, and the first is skipped while the instruction does not change: its slots
of the cache are never overwritten by anything else.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..model.config import BlockVLAConfig
from ..model.prefix_layout import graph_positions, layout_for
from .kv_cache import KVCache
from .pass_masks import action_mask, prefix_action_mask, prefix_mask, windowed
from .tables import Tables


@dataclass
class PrefixInputs:
    """One observation, preprocessed (see runtime.preprocess)."""

    pixels: np.ndarray  # [1, 3, S, S] float32, normalized
    text_ids: np.ndarray  # [1, Lt] int64, left-padded
    text_valid: np.ndarray  # [1, Lt] bool
    state: Optional[np.ndarray] = None  # [1, S] float32, normalized

    def prefix_valid(self, config: BlockVLAConfig) -> np.ndarray:
        """[P] bool in the layout of `config` (model.prefix_layout)."""
        return layout_for(config).valid(self.text_valid.reshape(-1))


class Engine(ABC):
    """Holds one KV cache; `prefill` starts a chunk, `step` evaluates action tokens after the committed ones."""

    name = 'abstract'
    dynamic_past = False  # whether the backend can read fewer than T_max cache slots (see the module doc)

    def __init__(self, config: BlockVLAConfig, kv_shape: tuple, tables: Tables, reuse_instruction: bool = True):
        self.config = config
        self.layout = layout_for(config)
        layers, kv_heads, head_dim = kv_shape
        self.kv_shape = tuple(kv_shape)
        self.cache = self._new_cache((layers, 2, kv_heads, config.max_seq_len, head_dim), config.max_seq_len)
        self.tables = tables
        self.split = self.layout.instruction_len  # prefix slots that depend on the instruction only
        self.reuse_instruction = bool(reuse_instruction) and self.split > 0
        self.prefix_valid = None  # [P] of the current chunk
        self.n_committed = 0  # action tokens in the cache
        self.text_kv_reused = False  # whether the last prefill reused the instruction's K/V
        self._instruction = None  # the instruction whose K/V the cache holds
        self.windows = list(config.attention_windows)  # sliding windows: one mask row each (runtime.pass_masks)

    # --- backend hooks --------------------------------------------------------------------------------------
    @abstractmethod
    def _alloc(self, shape: tuple):
        """A zeroed cache buffer of `shape` in the backend's array type and the graph's float type."""

    def _new_cache(self, shape: tuple, max_len: int) -> KVCache:
        """The KV cache over a buffer of `shape` [layers, 2, kv_heads, T_max, head_dim] (a backend whose kernels write
        a pass's K/V in place may give it spare slots after T_max, or keep some layers apart)."""
        return KVCache(self._alloc(shape), max_len)

    @abstractmethod
    def _vision(self, pixels: np.ndarray) -> np.ndarray:
        """pixels [1, 3, S, S] float32 -> image tokens numpy [1, Ni, hidden]."""

    @abstractmethod
    def _backbone(self, embeds: np.ndarray, positions: np.ndarray, mask: np.ndarray, rows: np.ndarray):
        """One backbone pass over the cache -> (logits numpy [m, n_bins] of `rows` (int64 [m], each in [0, n)),
        new_kv backend array)."""

    # --- the interface the decode loop uses -------------------------------------------------------------------
    def prefill(self, prefix: PrefixInputs) -> np.ndarray:
        embeds, positions, attention, valid, lo = self._start_chunk(prefix)
        logits = self._prefix_pass(embeds, positions, attention, valid, lo, self.layout.length)
        self.prefix_valid = valid
        return logits[-1]

    def prefill_step(self, prefix: PrefixInputs, tokens, commit: int = 0, block_size: int = 1,
                     rows: Optional[slice] = None) -> tuple:
        """`prefill(prefix)` and then `step(tokens, commit, block_size, rows)` in one backbone pass over [the prefix
        (its observation part when the instruction's K/V is kept) ; the action tokens]: the prefix attends as in
        the prefill and never sees the actions, the actions see the prefix and each other as in the step, and the
        prefix's K/V and the first `commit` tokens' join the cache. -> (prefill's logits [n_bins], step's logits)"""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        n = tokens.shape[0]
        idx = _row_index(rows, n)
        embeds, positions, attention, valid, lo = self._start_chunk(prefix)
        P = self.layout.length
        n_p = P - lo
        past = max(lo, 1) if self.dynamic_past else self.cache.max_len
        act_pos = self.layout.action_positions(valid, 0, n)  # [n] / [3, n]
        pos = np.concatenate([positions[..., lo:], act_pos], axis=-1)  # [n_p + n] / [3, n_p + n]
        mask = self._windowed(prefix_action_mask(attention, valid, lo, past, commit, n, block_size), pos)
        embeds = np.concatenate([embeds[:, lo:], self.tables.actions(tokens).astype(embeds.dtype, copy=False)], 1)
        rows_ = np.concatenate([[n_p - 1], n_p + idx]).astype(np.int64)  # the prefix's last row, then the step's
        logits, new_kv = self._backbone(embeds, graph_positions(pos), mask, rows_)
        self.cache.write(lo, new_kv, n_p + commit, np.concatenate([valid[lo:], np.ones(commit, bool)]), _row(pos))
        self.prefix_valid, self.n_committed = valid, commit
        return logits[0], logits[1:1 + len(idx)]

    def step(self, tokens, commit: int = 0, block_size: int = 1, rows: Optional[slice] = None) -> np.ndarray:
        """Evaluate action tokens [n] at the next n action positions; the first `commit` join the cache. -> logits
        [n, n_bins], or of `rows` only (a contiguous slice of range(n) or int indices into it; none returns
        [0, n_bins])."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        n, first = tokens.shape[0], self.n_committed
        idx = _row_index(rows, n)
        positions = self.layout.action_positions(self.prefix_valid, first, n)  # [n] / [3, n]
        mask = self._windowed(action_mask(self.cache.valid, first, commit, n, block_size), positions)
        logits, new_kv = self._backbone(self.tables.actions(tokens), graph_positions(positions), mask,
                                        idx if len(idx) else np.array([n - 1], np.int64))
        if commit:
            self.cache.write(self.layout.length + first, new_kv, commit, positions=_row(positions))
            self.n_committed += commit
        return logits[:len(idx)]

    def forget_instruction(self) -> None:
        """Drop the reused instruction K/V (the next prefill recomputes it)."""
        self._instruction = None

    def synchronize(self) -> None:
        """Wait until the work this engine queued on a device is done (a benchmark reads its timer after this). The
        calls return host logits, but a GPU engine may still be writing the committed slots into its cache."""

    def describe(self) -> dict:
        """What this engine runs on (reported in diagnostics)."""
        return {'engine': self.name, 'reuse_text_kv': self.reuse_instruction}

    # --- helpers ----------------------------------------------------------------------------------------------
    def _start_chunk(self, prefix: PrefixInputs) -> tuple:
        """Empty the cache (but a kept instruction) and run the instruction pass when its K/V are not kept. ->
        (embeds [1, P, hidden], positions [P] / [3, P], attention [P, P], valid [P], lo: the first prefix slot
        the last prefix pass computes)"""
        lay = self.layout
        valid = lay.valid(prefix.text_valid.reshape(-1))  # [P]
        attention = lay.attention(valid)  # [P, P]
        positions = lay.positions(valid)  # [P] (or [3, P])
        embeds = self._prefix_embeds(prefix)  # [1, P, hidden]
        self.cache.truncate(0)
        self.n_committed = 0
        lo, self.text_kv_reused = 0, False
        if self.reuse_instruction:
            lo = self.split
            key = (prefix.text_ids.tobytes(), prefix.text_valid.tobytes())
            self.text_kv_reused = key == self._instruction
            if self.text_kv_reused:
                self.cache.valid[:lo] = valid[:lo]
            else:
                self._instruction = None  # until the pass has written the slots
                self._prefix_pass(embeds, positions, attention, valid, 0, lo)
                self._instruction = key
        return embeds, positions, attention, valid, lo

    def _prefix_embeds(self, prefix: PrefixInputs) -> np.ndarray:
        parts = []
        for seg in self.layout.segments:
            if seg.source == 'text':
                parts.append(self.tables.text(prefix.text_ids))
            elif seg.source == 'image':
                parts.append(self._vision(prefix.pixels).astype(self.tables.dtype, copy=False))
            elif seg.source == 'state':
                if prefix.state is None:
                    raise ValueError(f'this policy needs a {self.config.state_dim}-dim state; none given')
                parts.append(self.tables.state(prefix.state))
            else:  # fixed template ids
                parts.append(self.tables.text(np.asarray(seg.ids)))
        return np.concatenate(parts, axis=1)  # [1, P, hidden]

    def _prefix_pass(self, embeds, positions, attention, valid, lo: int, hi: int) -> np.ndarray:
        """Backbone over prefix slots [lo, hi); their K/V go to the same cache slots. -> logits [1, n_bins] of the
        last one."""
        past = max(lo, 1) if self.dynamic_past else self.cache.max_len
        mask = self._windowed(prefix_mask(attention, lo, hi, past), positions[..., lo:hi])
        logits, new_kv = self._backbone(embeds[:, lo:hi], graph_positions(positions[..., lo:hi]), mask,
                                        np.array([hi - lo - 1], np.int64))
        self.cache.write(lo, new_kv, hi - lo, valid[lo:hi], _row(positions[..., lo:hi]))
        return logits

    def _windowed(self, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """A pass mask [1, 1, n, past + n] -> one row per sliding window (none: as it is), [K, 1, n, past + n]."""
        if not self.windows:
            return mask
        past = mask.shape[-1] - mask.shape[-2]  # the cache slots the pass reads
        return windowed(mask, positions, self.cache.positions[:past], self.windows)  # 1-D: windows refuse M-RoPE


def _range(rows: Optional[slice], n: int) -> tuple:
    """A contiguous slice of range(n) (None: all) -> (lo, hi)."""
    lo, hi, stride = (slice(None) if rows is None else rows).indices(n)
    if stride != 1:
        raise ValueError(f'rows must be a contiguous slice, got {rows}')
    return lo, max(hi, lo)


def _row_index(rows, n: int) -> np.ndarray:
    """The logit rows a pass over n tokens returns: None (all), a contiguous slice of range(n), or int indices into
    it -> int64 [m]. (The backbone is never asked for none: `step` computes the last row then, m >= 1 keeping every
    graph shape non-empty, and returns none of it.)"""
    if rows is None or isinstance(rows, slice):
        lo, hi = _range(rows, n)
        return np.arange(lo, hi, dtype=np.int64)
    idx = np.asarray(rows, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f'rows must index range({n}), got {idx.tolist()}')
    return idx


def _row(positions: np.ndarray) -> np.ndarray:
    """[n] positions as they are; M-RoPE [3, n]: the temporal row (recorded only; windows never apply there)."""
    return positions.reshape(-1, positions.shape[-1])[0]
