"""SlotTokenizer: a VLM policy's instruction -> the ids of its prompt's instruction slot (no torch, no transformers).

The VLM's own `tokenizer.json`, read with the `tokenizers` library, in training and at run time alike. The slot
holds `slot_format.format(instruction)` (PaliGemma: the instruction and its "\\n") tokenized without special tokens,
exactly the ids the HF processor puts there inside the whole prompt (model.vlm.load checks that when the layout is
built). An instruction that tokenizes to a special token (`<image>`, `<|im_end|>`, BOS ...) is refused: a topic's
text must not rewrite the prompt's structure.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..text_tokenizer import _FixedLength


class SlotTokenizer(_FixedLength):
    def __init__(self, tokenizer_json: str | os.PathLike, max_len: int, slot_format: str = '{}', pad_id: int = 0):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError('a VLM policy needs the tokenizers package (pip install tokenizers)') from e
        self.path = Path(tokenizer_json)
        if not self.path.is_file():
            raise FileNotFoundError(f'{self.path}: the VLM\'s tokenizer.json is missing (a fast tokenizer is needed)')
        try:
            self.tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises its own exception type for a malformed file
            raise ValueError(f'{self.path}: not a readable tokenizer.json ({e})') from None
        if slot_format.count('{}') != 1:
            raise ValueError(f"slot_format must hold one '{{}}', got {slot_format!r}")
        self.max_len = int(max_len)
        self.pad_id = int(pad_id)
        self.slot_format = slot_format
        self.special = {i: t.content for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def _ids(self, text: str) -> list:
        ids = list(self.tok.encode(self.slot_format.format(text.strip()), add_special_tokens=False).ids)
        bad = sorted({self.special[i] for i in ids if i in self.special})
        if bad:
            raise ValueError(f'instruction "{text[:60]}" contains special tokens {bad}; they would change the '
                             'structure of the VLM prompt')
        return ids

    def save_files(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json into `folder` (a checkpoint: the exporter copies it into the policy folder)."""
        (Path(folder) / 'tokenizer.json').write_bytes(self.path.read_bytes())


def slot_tokenizer(folder, max_len: int, layout: dict, files=None) -> SlotTokenizer:
    """The slot tokenizer for a resolved layout dict (`config.vlm_layout`): the tokenizer.json among `files` (a
    policy folder's listed files), else the one in `folder` (a VLM or checkpoint folder)."""
    path = next((Path(f) for f in files or () if Path(f).name == 'tokenizer.json'), None)
    if path is None:
        if folder is None:
            raise ValueError('a VLM policy needs its tokenizer.json (a folder or the policy\'s tokenizer files)')
        path = Path(folder) / 'tokenizer.json'
    return SlotTokenizer(path, max_len, layout.get('slot_format', '{}'))
