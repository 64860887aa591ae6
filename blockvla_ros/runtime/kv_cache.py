"""KVCache: one preallocated [layers, 2, kv_heads, T_max, head_dim] buffer plus a validity row, tiny API.

The buffer is whatever array type the engine computes with (numpy, torch, a device buffer wrapped as an array):
only slice assignment is used. Nothing is allocated per step.
"""
from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, buffer, max_len: int):
        self.buffer = buffer  # [layers, 2, kv_heads, T_max, head_dim]
        self.max_len = int(max_len)
        self.valid = np.zeros((1, self.max_len), dtype=bool)  # [1, T_max]: which slots a query may attend
        self.length = 0  # slots written so far (prefix slots count even when they are padding)

    def reset(self) -> None:
        self.valid[:] = False
        self.length = 0

    def set_prefix(self, kv, prefix_valid: np.ndarray) -> None:
        """Write the prefill's K/V [layers, 2, kv_heads, P, head_dim]; padding slots stay invalid."""
        p = prefix_valid.shape[-1]
        self.reset()
        self.buffer[:, :, :, :p] = kv
        self.valid[0, :p] = prefix_valid.reshape(-1)
        self.length = p

    def append(self, kv) -> None:
        """Commit n new slots [layers, 2, kv_heads, n, head_dim] after the current length."""
        n = kv.shape[3]
        if self.length + n > self.max_len:
            raise RuntimeError(f'KV cache overflow: {self.length} + {n} > {self.max_len} slots')
        self.buffer[:, :, :, self.length:self.length + n] = kv
        self.valid[0, self.length:self.length + n] = True
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (e.g. back to the prefix for the next chunk)."""
        self.valid[0, length:] = False
        self.length = min(self.length, length)
