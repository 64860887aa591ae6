"""Instruction tokenizers that produce the fixed-length, left-padded text slots of the prefix.

`ByteTokenizer` needs no files (tiny test backbones). `FileTextTokenizer` reads a policy folder's `tokenizer.json`
(+ `tokenizer_config.json`) with the `tokenizers` library from the explicit file paths it is given (the files the
policy's manifest lists, nothing found by searching a folder): what the runtime uses, with neither torch nor
transformers. `HFTextTokenizer` wraps transformers' AutoTokenizer on a backbone folder (training and export, where
transformers is installed anyway); export checks that both give the same ids.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

MAX_INSTRUCTION_BYTES = 4096  # anything longer is refused before tokenization


class _FixedLength:
    """Shared pad/validate logic: ids [max_len] int64 and valid [max_len] bool, left-padded."""

    max_len: int
    pad_id: int = 0

    def _ids(self, text: str) -> list:
        raise NotImplementedError

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(text, str):
            raise ValueError(f'instruction must be a string, got {type(text).__name__}')
        if not text.strip():
            raise ValueError('instruction is empty')
        if len(text.encode('utf-8', 'replace')) > MAX_INSTRUCTION_BYTES:
            raise ValueError(f'instruction is {len(text.encode("utf-8", "replace"))} bytes; the limit is '
                             f'{MAX_INSTRUCTION_BYTES}')
        ids = self._ids(text)
        if not ids:
            raise ValueError(f'instruction "{text[:60]}" encodes to no tokens with this tokenizer')
        if len(ids) > self.max_len:
            raise ValueError(f'instruction is {len(ids)} tokens long; this policy accepts at most {self.max_len} '
                             f'(max_text_tokens): "{text[:60]}..."')
        out = np.full(self.max_len, self.pad_id, dtype=np.int64)
        valid = np.zeros(self.max_len, dtype=bool)
        if ids:
            out[self.max_len - len(ids):] = ids
            valid[self.max_len - len(ids):] = True
        return out, valid


class ByteTokenizer(_FixedLength):
    """UTF-8 bytes -> ids (byte + 2); 0 = pad, 1 = bos. Needs a backbone vocabulary of at least 258."""

    offset = 2
    bos_id = 1

    def __init__(self, max_len: int, vocab_size: int):
        if vocab_size < 256 + self.offset:
            raise ValueError(f'the byte tokenizer needs vocab_size >= {256 + self.offset}, backbone has {vocab_size}')
        self.max_len = int(max_len)

    def _ids(self, text: str) -> list:
        return [self.bos_id] + [b + self.offset for b in text.strip().lower().encode('utf-8', 'replace')]


class HFTextTokenizer(_FixedLength):
    """AutoTokenizer from a local folder (no hub access)."""

    def __init__(self, path: str, max_len: int):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError('text_tokenizer: auto needs the transformers package (pip install transformers)') from e
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.path = path
        self.max_len = int(max_len)
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else 0)

    def _ids(self, text: str) -> list:
        ids = list(self.tok(text.strip(), add_special_tokens=True)['input_ids'])
        # [UNK] counts as content: a word-level vocabulary maps an out-of-vocabulary instruction to [BOS] [UNK]..,
        # which is uninformative but legitimate; only control tokens (BOS/EOS/PAD) and nothing else is refused
        special = set(self.tok.all_special_ids) - {self.tok.unk_token_id}
        if ids and all(i in special for i in ids):
            # e.g. a word-level tokenizer.json in a qwen2 folder: AutoTokenizer forces Qwen2Tokenizer, which then
            # maps every instruction to the same special tokens: a policy would train blind to its instruction
            raise ValueError(f'instruction "{text[:60]}" encodes to special tokens only ({ids}) with the '
                             f'{type(self.tok).__name__} loaded from {self.path}: the tokenizer files do not '
                             'match the tokenizer class this folder selects (tokenizer_config.json / model_type)')
        return ids


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json writes a special token as a string or as {'content': ...}."""
    if isinstance(value, dict):
        value = value.get('content')
    return value if isinstance(value, str) and value else None


class FileTextTokenizer(_FixedLength):
    """`tokenizer.json` read with the `tokenizers` library (no torch, no transformers).

    ``files``: explicit paths; one must be named tokenizer.json, and a tokenizer_config.json among them gives the
    pad token (else id 0). No other file is opened. Special tokens (BOS/EOS/PAD...) are the added tokens marked
    special; [UNK] counts as content, as in HFTextTokenizer.
    """

    def __init__(self, files: Sequence[str | os.PathLike], max_len: int):
        by_name = {Path(f).name: Path(f) for f in files}
        if 'tokenizer.json' not in by_name:
            raise ValueError(f'text_tokenizer: auto needs a tokenizer.json among the policy\'s tokenizer files, got '
                             f'{sorted(by_name)}; re-export the policy from a backbone with a fast tokenizer')
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError('text_tokenizer: auto needs the tokenizers package (pip install tokenizers)') from e
        self.path = by_name['tokenizer.json']
        try:
            self.tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises its own exception type for a malformed file
            raise ValueError(f'{self.path}: not a readable tokenizer.json ({e})') from None
        settings = {}
        if 'tokenizer_config.json' in by_name:
            try:
                settings = json.loads(by_name['tokenizer_config.json'].read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f'{by_name["tokenizer_config.json"]}: not readable JSON ({e})') from None
            if not isinstance(settings, dict):
                raise ValueError(f'{by_name["tokenizer_config.json"]}: expected a JSON object')
        self.max_len = int(max_len)
        pad = _token_text(settings.get('pad_token'))
        pad_id = self.tok.token_to_id(pad) if pad else None
        self.pad_id = int(pad_id) if pad_id is not None else 0
        unk = _token_text(settings.get('unk_token'))
        unk_id = self.tok.token_to_id(unk) if unk else None
        self.special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special} - {unk_id}

    def _ids(self, text: str) -> list:
        ids = list(self.tok.encode(text.strip(), add_special_tokens=True).ids)
        if ids and all(i in self.special for i in ids):
            raise ValueError(f'instruction "{text[:60]}" encodes to special tokens only ({ids}) with {self.path}')
        return ids


def load_text_tokenizer(kind: str, max_len: int, vocab_size: int, folder: Optional[str | os.PathLike] = None,
                        files: Optional[Sequence[str | os.PathLike]] = None):
    """'byte' -> ByteTokenizer; 'auto' -> FileTextTokenizer over ``files`` (a policy's listed tokenizer files: the
    runtime) or HFTextTokenizer over ``folder`` (a backbone or checkpoint folder: training, export)."""
    if kind == 'byte':
        return ByteTokenizer(max_len, vocab_size)
    if kind == 'auto':
        if files is not None:
            return FileTextTokenizer(files, max_len)
        if folder is None or not os.path.isdir(folder):
            raise ValueError(f'text_tokenizer: auto needs a folder with tokenizer files, got {folder}')
        return HFTextTokenizer(str(folder), max_len)
    raise ValueError(f"unknown text_tokenizer {kind!r} (expected 'byte' or 'auto')")
