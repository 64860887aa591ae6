"""Instruction tokenizers that produce the fixed-length, left-padded text slots of the prefix.

`ByteTokenizer` needs no files (tests, the demo, tiny backbones); `HFTextTokenizer` wraps the tokenizer saved in a
real backbone's local folder. Pure Python / numpy: the runtime uses these without torch.
"""
from __future__ import annotations

import os
from typing import Optional

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


def load_text_tokenizer(kind: str, max_len: int, vocab_size: int, folder: Optional[str | os.PathLike] = None):
    """'byte' -> ByteTokenizer; 'auto' -> the tokenizer files in `folder` (a policy folder or backbone folder)."""
    if kind == 'byte':
        return ByteTokenizer(max_len, vocab_size)
    if kind == 'auto':
        if folder is None or not os.path.isdir(folder):
            raise ValueError(f'text_tokenizer: auto needs a folder with tokenizer files, got {folder}')
        return HFTextTokenizer(str(folder), max_len)
    raise ValueError(f"unknown text_tokenizer {kind!r} (expected 'byte' or 'auto')")
