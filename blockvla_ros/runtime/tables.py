"""The small tables the runtime applies in numpy: text and action embeddings, the state projection.

They are stored once, in the policy folder's `tables.safetensors` (written by the exporter from
`model.graphs.tables`), and read here with a ~30-line safetensors reader over a memory map: no torch, no
safetensors package, and only the rows a prediction touches are paged in (a 150k-word embedding table costs its
size on disk, not in RAM).

    text_embed    [vocab, hidden]       instruction ids (and fixed template ids) -> embeddings
    action_embed  [n_bins + 1, hidden]  action tokens and [MASK] (id n_bins) -> embeddings
    state_proj.weight [hidden, S], state_proj.bias [hidden]   normalized state -> one prefix embedding
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np

_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': np.uint16, 'I64': np.int64,
           'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}
MAX_HEADER = 100 << 20


class TablesError(ValueError):
    """A tables file is not a readable safetensors file, or its tables do not fit the policy."""


def read_safetensors(path: str | os.PathLike) -> dict:
    """{name: read-only numpy array memory-mapped from `path`} (BF16 tensors are converted to float32)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) != 8:
            raise TablesError(f'{path}: not a safetensors file (shorter than 8 bytes)')
        n = struct.unpack('<Q', head)[0]
        if n > min(MAX_HEADER, size - 8):
            raise TablesError(f'{path}: not a safetensors file (header length {n} of a {size}-byte file)')
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TablesError(f'{path}: unreadable safetensors header ({e})') from e
    out = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        try:
            dtype = np.dtype(_DTYPES[info['dtype']])
            shape = tuple(int(d) for d in info['shape'])
            begin, end = (int(x) for x in info['data_offsets'])
        except (KeyError, TypeError, ValueError) as e:
            raise TablesError(f'{path}: tensor {name!r} has an unsupported entry {info!r}') from e
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize or not 0 <= begin <= end <= size - 8 - n:
            raise TablesError(f'{path}: tensor {name!r} does not fit the file (offsets {begin}..{end})')
        arr = np.memmap(path, dtype=dtype, mode='r', offset=8 + n + begin, shape=shape) if count else \
            np.zeros(shape, dtype)
        if info['dtype'] == 'BF16':
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
    return out


class Tables:
    """Embedding lookups and the state projection, in numpy, in the graph's float type."""

    def __init__(self, arrays: dict, dtype=np.float32):
        missing = [k for k in ('text_embed', 'action_embed') if k not in arrays]
        if missing:
            raise TablesError(f'tables {missing} are missing')
        self.text_embed = arrays['text_embed']
        self.action_embed = arrays['action_embed']
        self.state_w = arrays.get('state_proj.weight')
        self.state_b = arrays.get('state_proj.bias')
        self.dtype = np.dtype(dtype)
        hidden = self.text_embed.shape[1]
        if self.action_embed.shape[1] != hidden or (self.state_w is not None and self.state_w.shape[0] != hidden):
            state = None if self.state_w is None else self.state_w.shape
            raise TablesError(f'tables disagree on the hidden size: text {self.text_embed.shape}, action '
                              f'{self.action_embed.shape}, state {state}')
        self.hidden = hidden

    @classmethod
    def open(cls, path: str | os.PathLike, dtype=np.float32) -> 'Tables':
        return cls(read_safetensors(path), dtype)

    def check(self, n_bins: int, state_dim: int, hidden: int, where: str) -> None:
        """The tables fit a policy with these sizes (raises TablesError naming `where`)."""
        if self.hidden != hidden or self.action_embed.shape[0] != n_bins + 1:
            raise TablesError(f'{where}: action_embed is {list(self.action_embed.shape)}, the policy needs '
                              f'[{n_bins + 1}, {hidden}]')
        has = 0 if self.state_w is None else self.state_w.shape[1]
        if has != state_dim:
            raise TablesError(f'{where}: the state projection reads {has} values, the policy {state_dim}')

    def _rows(self, table: np.ndarray, ids, what: str) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
            raise ValueError(f'{what} id out of range [0, {table.shape[0]}): {ids.min()}..{ids.max()}')
        return np.take(table, ids, axis=0).astype(self.dtype, copy=False)[None]  # [n] -> [1, n, hidden]

    def text(self, ids) -> np.ndarray:
        return self._rows(self.text_embed, ids, 'text token')

    def actions(self, tokens) -> np.ndarray:
        return self._rows(self.action_embed, tokens, 'action token')

    def state(self, state: Optional[np.ndarray]) -> np.ndarray:
        """Normalized state [1, S] -> [1, 1, hidden]."""
        if self.state_w is None:
            raise ValueError('this policy has no state projection')
        s = np.asarray(state, dtype=np.float32).reshape(-1)
        out = self.state_w.astype(np.float32, copy=False) @ s + self.state_b
        return out.astype(self.dtype, copy=False)[None, None]
