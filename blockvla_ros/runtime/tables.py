"""The small tables the runtime applies in numpy: text and action embeddings, the state projection.

They are stored once, in the policy folder's `tables.safetensors` (written by the exporter from
`model.graphs.tables`), and read here with a ~30-line safetensors reader: no torch, no safetensors package. The
text table stays on disk and only the rows a prediction touches are read (`FileRows`: a 150k-word embedding table
costs its size on disk, not in RAM); the small tables are read into memory.

    text_embed    [vocab, hidden]       instruction ids (and fixed template ids) -> embeddings
    action_embed  [n_bins + 1, hidden]  action tokens and [MASK] (id n_bins) -> embeddings
    state_proj.weight [hidden, S], state_proj.bias [hidden]   normalized state -> one prefix embedding

The text table is the big one (Qwen2.5-0.5B: 151,936 x 896, 28 % of the parameters), so int8 / int4 exports store
it quantized; this docstring is the one description of that layout (`quantize_text` writes it, `Tables` reads it):

    float (fp32, fp16 exports; every folder written before quantized tables)
      text_embed        F32 | F16  [vocab, hidden]
    int8 export                                              (G = the group size, below)
      text_embed.int8   I8   [vocab, hidden]                 q = clip(rint(x / s), -127, 127)
      text_embed.scale  F16  [vocab, ceil(hidden / G)]       s = max |x| / 127 over each group of G values of a row
    int4 export
      text_embed.int4   U8   [vocab, ceil(hidden / 2)]       q = clip(rint(x / s), -7, 7) + 8, two per byte:
                                                             value 2j in the low nibble, 2j + 1 in the high one
      text_embed.scale  F16  [vocab, ceil(hidden / G)]       s = max |x| / 7 over each group of G values of a row
    dequantized row:  x[j] = (q[j] (- 8 for int4)) * s[j // G]      (the last group of a row may be shorter)
    __metadata__      {"text_embed.group": "G"}              G: a power of two >= 16, the exporter's
                                                             --quant-block-size; absent = 32 (tables written
                                                             before the group was recorded)

Symmetric groups of G along the row, like the backbone's MatMulNBits blocks (same size: export.precision). A lookup
dequantizes only the rows it reads, so the table stays on disk (runner RSS does not grow with the vocabulary). The
width of a row comes from action_embed, which (like state_proj) stays in the graph's float type: both are small.
Exactly one text layout per file; anything else (a wrong dtype, a scale shape that does not fit, a group that is not
a power of two >= 16, a group recorded for a float table) is a TablesError naming the tensor or key.
"""
from __future__ import annotations

import json
import os
import struct
import weakref
from pathlib import Path
from typing import Optional

import numpy as np

_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': np.uint16, 'I64': np.int64,
           'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}
MAX_HEADER = 100 << 20
TEXT = 'text_embed'
GROUP = 32  # values per scale along a quantized text row, when the file records none
GROUP_KEY = 'text_embed.group'  # __metadata__ key of the group size (a decimal string)
QUANTIZED = {8: 'text_embed.int8', 4: 'text_embed.int4'}  # bits -> tensor name
SCALE = 'text_embed.scale'
_QMAX = {8: 127, 4: 7}
_QDTYPE = {8: np.int8, 4: np.uint8}


class TablesError(ValueError):
    """A tables file is not a readable safetensors file, or its tables do not fit the policy."""


def read_header(f, path, size: int, metadata: Optional[dict] = None) -> tuple:
    """The header of the safetensors file open as `f` (`size` bytes): ({name: {dtype, shape, data_offsets}} without
    __metadata__, the file offset its data_offsets count from). TablesError (a ValueError) if it is not one. The
    file's __metadata__ (str -> str), if any, is copied into `metadata` when one is given."""
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
    if not isinstance(header, dict):
        raise TablesError(f'{path}: not a safetensors file (its header is not a JSON object)')
    meta = header.pop('__metadata__', None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TablesError(f'{path}: __metadata__ must map strings to strings, got {meta!r:.200}')
    if metadata is not None:
        metadata.update(meta)
    return header, 8 + n


class _Descriptor:
    """A file opened for reading once; closed when the last FileRows using it goes."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        st = os.fstat(self.fd)
        self.identity = (st.st_size, st.st_mtime_ns)  # the file as it was read: a change means it was rewritten
        weakref.finalize(self, os.close, self.fd)


class FileRows:
    """A [rows, ...] tensor of a file whose rows are read on demand with os.pread (``np.take(rows, ids, axis=0)``).

    Not a memory map: a mapped file truncated under a running policy (``cp`` over its folder rewrites files in place)
    killed the process with SIGBUS at the next lookup. Here a lookup checks that the file is still the one that was
    opened (size and mtime) and raises TablesError naming it otherwise; a file replaced by rename is never seen (the
    descriptor keeps the one that was opened)."""

    def __init__(self, path: Path, descriptor: _Descriptor, offset: int, dtype, shape: tuple):
        self.path, self._file, self._offset = path, descriptor, offset
        self.dtype, self.shape, self.ndim = np.dtype(dtype), tuple(shape), len(shape)
        self._row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize  # bytes per row

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, ids, axis=0, out=None, mode='raise') -> np.ndarray:
        """Rows ``ids`` -> a new array [n, ...] (what np.take calls; ids checked by the caller)."""
        if axis != 0 or out is not None:
            raise NotImplementedError('FileRows.take reads whole rows (axis 0) into a new array')
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        st = os.fstat(self._file.fd)
        if (st.st_size, st.st_mtime_ns) != self._file.identity:
            raise TablesError(f'{self.path}: changed on disk since the policy was loaded (rewritten in place, e.g. '
                              'copied over); load the policy again')
        buf = bytearray(len(ids) * self._row)
        for k, i in enumerate(ids.tolist()):
            row = os.pread(self._file.fd, self._row, self._offset + i * self._row)
            if len(row) != self._row:
                raise TablesError(f'{self.path}: row {i} is beyond the end of the file (changed on disk)')
            buf[k * self._row:(k + 1) * self._row] = row
        return np.frombuffer(buf, self.dtype).reshape((len(ids),) + self.shape[1:])  # [n * row] -> [n, ...]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Every row (tests and small tables; a lookup reads only its rows)."""
        rows = self.take(np.arange(self.shape[0]))
        return rows if dtype is None else rows.astype(dtype)


ON_DISK = frozenset((TEXT, SCALE, *QUANTIZED.values()))  # the text table's tensors: read row by row (FileRows)


def read_safetensors(path: str | os.PathLike, metadata: Optional[dict] = None) -> dict:
    """{name: numpy array} of the file at `path`: the text table's tensors as FileRows (read row by row, see there),
    the others read into memory (BF16 converted to float32); the file's __metadata__ is copied into `metadata` when
    one is given."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, 'rb') as f:
        header, start = read_header(f, path, size, metadata)
    descriptor = _Descriptor(path)
    out = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info['dtype']])
            shape = tuple(int(d) for d in info['shape'])
            begin, end = (int(x) for x in info['data_offsets'])
        except (KeyError, TypeError, ValueError) as e:
            raise TablesError(f'{path}: tensor {name!r} has an unsupported entry {info!r}') from e
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize or not 0 <= begin <= end <= size - start:
            raise TablesError(f'{path}: tensor {name!r} does not fit the file (offsets {begin}..{end})')
        if count and name in ON_DISK and len(shape) >= 1 and info['dtype'] != 'BF16':
            out[name] = FileRows(path, descriptor, start + begin, dtype, shape)
            continue
        data = os.pread(descriptor.fd, end - begin, start + begin) if count else b''
        if len(data) != end - begin:
            raise TablesError(f'{path}: tensor {name!r} is cut short (the file changed while it was read)')
        arr = np.frombuffer(data, dtype).reshape(shape) if count else np.zeros(shape, dtype)
        if info['dtype'] == 'BF16':
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
    return out


def _groups(hidden: int, group: int) -> int:
    return -(-hidden // group)


def check_group(group, what: str = 'group size') -> int:
    """A quantization group / block size: a power of two >= 16 (MatMulNBits' rule, whose block the text table's
    group follows). -> it as an int; ValueError naming `what` otherwise."""
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 16 or group & (group - 1):
        raise ValueError(f'{what} must be a power of two >= 16 (e.g. 32, 64, 128), got {group!r}')
    return int(group)


def text_group(metadata: dict) -> Optional[int]:
    """The text table's group size recorded in a tables file's __metadata__ (None if it records none)."""
    if GROUP_KEY not in metadata:
        return None
    raw = metadata[GROUP_KEY]
    try:
        return check_group(int(raw) if raw.isascii() and raw.isdigit() else raw, f'__metadata__ {GROUP_KEY}')
    except ValueError as e:
        raise TablesError(str(e)) from None


def _width(bits: int, hidden: int) -> int:
    """Stored bytes of one quantized row."""
    return hidden if bits == 8 else -(-hidden // 2)


def quantize_text(table: np.ndarray, bits: int, group: int = GROUP, rows: int = 8192) -> tuple:
    """A float text table [vocab, hidden] -> ({QUANTIZED[bits]: q, SCALE: s}, {GROUP_KEY: str(group)}): the arrays and
    the file's __metadata__ in the layout of the module doc.

    Works `rows` rows at a time, so the float temporaries stay small next to a 0.5 GB table."""
    if bits not in _QMAX:
        raise ValueError(f'text table bits must be one of {sorted(_QMAX)}, got {bits!r}')
    group = check_group(group, 'text table group size')
    vocab, hidden = table.shape
    groups, qmax = _groups(hidden, group), _QMAX[bits]
    q = np.empty((vocab, _width(bits, hidden)), _QDTYPE[bits])
    scale = np.empty((vocab, groups), np.float16)
    for lo in range(0, vocab, rows):
        x = np.zeros((min(rows, vocab - lo), groups * group), np.float32)  # the last group padded with zeros
        x[:, :hidden] = table[lo:lo + rows]
        g = x.reshape(len(x), groups, group)  # [n, groups * G] -> [n, groups, G]
        s = (np.abs(g).max(axis=-1) / qmax).astype(np.float16)  # [n, groups]: rounded as stored
        if not np.isfinite(s).all():
            raise ValueError(f'{TEXT} rows {lo}..{lo + len(x)} hold values that are not finite or exceed float16 '
                             f'scales ({qmax} x 65504): cannot store the table at int{bits}')
        s32 = s.astype(np.float32)[..., None]  # [n, groups, 1]
        v = np.divide(g, s32, out=np.zeros_like(g), where=s32 > 0)
        v = np.clip(np.rint(v), -qmax, qmax).reshape(len(x), -1)  # [n, groups, G] -> [n, groups * G]
        if bits == 8:
            q[lo:lo + len(x)] = v[:, :hidden]
        else:
            u = (v[:, :2 * q.shape[1]] + 8).astype(np.uint8)  # [n, 2 * width]: 1..15, padding 8 (= 0)
            q[lo:lo + len(x)] = u[:, 0::2] | (u[:, 1::2] << 4)
        scale[lo:lo + len(x)] = s
    return {QUANTIZED[bits]: q, SCALE: scale}, {GROUP_KEY: str(group)}


def _dequantize(q: np.ndarray, scale: np.ndarray, bits: int, hidden: int, group: int) -> np.ndarray:
    """Quantized rows [n, width] and their scales [n, groups] -> float32 rows [n, hidden]."""
    if bits == 4:
        v = np.empty((q.shape[0], 2 * q.shape[1]), np.float32)  # [n, width] -> [n, 2 * width]
        v[:, 0::2] = q & 0x0F
        v[:, 1::2] = q >> 4
        v = v[:, :hidden] - 8
    else:
        v = q.astype(np.float32)
    return v * np.repeat(scale.astype(np.float32), group, axis=1)[:, :hidden]  # [n, groups] -> [n, hidden]


def _text_layout(arrays: dict, hidden: int, group: Optional[int]) -> tuple:
    """-> (bits or None, table or q, scale or None, group or None) after checking the text table's names, dtypes and
    shapes against `group` (the file's recorded group size; None: none recorded, 32)."""
    present = [k for k in (TEXT, *QUANTIZED.values()) if k in arrays]
    if len(present) != 1:
        raise TablesError(f'expected exactly one text table ({TEXT}, or {" or ".join(QUANTIZED.values())} with '
                          f'{SCALE}), found {present or "none"}')
    name = present[0]
    table = arrays[name]
    if name == TEXT:
        if table.ndim != 2 or table.dtype not in (np.float32, np.float16):
            raise TablesError(f'{TEXT} must be a float32/float16 [vocab, hidden] table, got {table.dtype} '
                              f'{list(table.shape)}')
        if SCALE in arrays:
            raise TablesError(f'{SCALE} is present but {TEXT} is not quantized')
        if group is not None:
            raise TablesError(f'__metadata__ {GROUP_KEY} is {group} but {TEXT} is not quantized')
        return None, table, None, None
    group = GROUP if group is None else group
    bits = next(b for b, k in QUANTIZED.items() if k == name)
    want = [table.shape[0] if table.ndim == 2 else 'vocab', _width(bits, hidden)]
    if table.dtype != _QDTYPE[bits] or list(table.shape) != want:
        raise TablesError(f'{name} is {table.dtype} {list(table.shape)}, expected {np.dtype(_QDTYPE[bits])} {want} '
                          f'(hidden size {hidden}, from action_embed)')
    if SCALE not in arrays:
        raise TablesError(f'{name} has no {SCALE} (one float16 scale per {group} values of each row)')
    scale, want = arrays[SCALE], [table.shape[0], _groups(hidden, group)]
    if scale.dtype != np.float16 or list(scale.shape) != want:
        raise TablesError(f'{SCALE} is {scale.dtype} {list(scale.shape)}, expected float16 {want} (one scale per '
                          f'{group} values of each of the {table.shape[0]} rows of {name})')
    return bits, table, scale, group


class Tables:
    """Embedding lookups and the state projection, in numpy, in the graph's float type."""

    def __init__(self, arrays: dict, dtype=np.float32, metadata: Optional[dict] = None):
        """`arrays`: the file's tensors; `metadata`: its __metadata__ (the text table's group size, if recorded)."""
        action = arrays.get('action_embed')
        if action is None:
            raise TablesError("table 'action_embed' is missing")
        if action.ndim != 2:
            raise TablesError(f'action_embed must be [n_bins + 1, hidden], got {list(action.shape)}')
        self.hidden = hidden = action.shape[1]
        self.text_bits, self.text_embed, self.text_scale, self.text_group = _text_layout(
            arrays, hidden, text_group(metadata or {}))
        self.action_embed = action
        self.state_w = arrays.get('state_proj.weight')
        self.state_b = arrays.get('state_proj.bias')
        self.dtype = np.dtype(dtype)
        text_width = self.text_embed.shape[1] if self.text_bits is None else hidden  # quantized: checked above
        if text_width != hidden or (self.state_w is not None and self.state_w.shape[0] != hidden):
            state = None if self.state_w is None else self.state_w.shape
            raise TablesError(f'tables disagree on the hidden size: text {self.text_embed.shape}, action '
                              f'{self.action_embed.shape}, state {state}')

    @property
    def text_layout(self) -> str:
        """How the text table is stored: its float dtype name, or 'int8' / 'int4' (see the module doc; its group
        size: text_group)."""
        return self.text_embed.dtype.name if self.text_bits is None else f'int{self.text_bits}'

    @classmethod
    def open(cls, path: str | os.PathLike, dtype=np.float32) -> 'Tables':
        metadata = {}
        arrays = read_safetensors(path, metadata)
        return cls(arrays, dtype, metadata)

    def check(self, n_bins: int, state_dim: int, hidden: int, where: str) -> None:
        """The tables fit a policy with these sizes (raises TablesError naming `where`)."""
        if self.hidden != hidden or self.action_embed.shape[0] != n_bins + 1:
            raise TablesError(f'{where}: action_embed is {list(self.action_embed.shape)}, the policy needs '
                              f'[{n_bins + 1}, {hidden}]')
        has = 0 if self.state_w is None else self.state_w.shape[1]
        if has != state_dim:
            raise TablesError(f'{where}: the state projection reads {has} values, the policy {state_dim}')

    @staticmethod
    def _ids(ids, rows: int, what: str) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= rows):
            raise ValueError(f'{what} id out of range [0, {rows}): {ids.min()}..{ids.max()}')
        return ids

    def text(self, ids) -> np.ndarray:
        """Token ids -> [1, n, hidden]; a quantized table dequantizes only these rows (the map stays a map)."""
        ids = self._ids(ids, self.text_embed.shape[0], 'text token')
        rows = np.take(self.text_embed, ids, axis=0)  # [n, hidden] or [n, width]
        if self.text_bits is not None:
            rows = _dequantize(rows, np.take(self.text_scale, ids, axis=0), self.text_bits, self.hidden,
                               self.text_group)
        return rows.astype(self.dtype, copy=False)[None]  # [n, hidden] -> [1, n, hidden]

    def actions(self, tokens) -> np.ndarray:
        ids = self._ids(tokens, self.action_embed.shape[0], 'action token')
        return np.take(self.action_embed, ids, axis=0).astype(self.dtype, copy=False)[None]  # [1, n, hidden]

    def state(self, state: Optional[np.ndarray]) -> np.ndarray:
        """Normalized state [1, S] -> [1, 1, hidden]."""
        if self.state_w is None:
            raise ValueError('this policy has no state projection')
        s = np.asarray(state, dtype=np.float32).reshape(-1)
        out = self.state_w.astype(np.float32, copy=False) @ s + self.state_b
        return out.astype(self.dtype, copy=False)[None, None]
