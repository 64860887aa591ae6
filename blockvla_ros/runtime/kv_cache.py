"""KVCache: one preallocated [layers, 2, kv_heads, T_max, head_dim] buffer plus a validity row, tiny API.

The buffer is whatever array type the engine computes with (numpy, torch, a device buffer): the backbone graph
reads it in place (per-layer views), and only slice assignment of the slots a pass commits writes to it. Nothing
is allocated per pass.
"""
from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, buffer, max_len: int):
        self.buffer = buffer  # [layers, 2, kv_heads, T_max, head_dim]
        self.max_len = int(max_len)
        self.valid = np.zeros(self.max_len, dtype=bool)  # [T_max]: which slots a query may attend
        self.positions = np.zeros(self.max_len, dtype=np.int64)  # [T_max]: each slot's position (sliding windows)

    def write(self, start: int, kv, count: int, valid=True, positions=None) -> None:
        """Copy the first `count` slots of kv [layers, 2, kv_heads, n >= count, head_dim] to slots start.. in place;
        `positions` [>= count]: their position ids."""
        if start + count > self.max_len:
            raise RuntimeError(f'KV cache overflow: {start} + {count} > {self.max_len} slots')
        if count:
            self._copy(start, kv, count)
        self.valid[start:start + count] = valid
        if positions is not None:
            self.positions[start:start + count] = np.asarray(positions)[:count]

    def _copy(self, start: int, kv, count: int) -> None:
        """The data copy of `write` (a backend may do it its own way, e.g. one index_copy_)."""
        self.buffer[:, :, :, start:start + count] = kv[:, :, :, :count]

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (their data stays until overwritten)."""
        self.valid[length:] = False
