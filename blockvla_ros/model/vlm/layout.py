"""PromptLayout: a pretrained VLM's prompt as fixed segments, with its position ids and prefix attention.

Pure numpy (the runtime uses it without torch). A VLM was pretrained on one prompt format; the policy keeps it, with
the instruction in a fixed-length, left-padded slot so every shape is static:

    PaliGemma   [image x256] <bos> [instruction + "\\n"]                                       (prefix-LM)
    SmolVLM2    <|im_start|>User:<fake><global-img> [image x64] <fake> [instruction]
                <end_of_utterance>\\nAssistant:
    Qwen2-VL    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<|vision_start|> [image xN]
                <|vision_end|> [instruction] <|im_end|>\\n<|im_start|>assistant\\n              (3-D positions)

and then an optional proprioceptive state token. Action tokens follow the prefix.

Segments (name, length, source): source 'fixed' (template ids, `ids`), 'image' (the vision part's output tokens),
'text' (the instruction slot; its padding is never attended and takes no position) and 'state'. Segments that
share a `span` attend to each other bidirectionally (PaliGemma puts the whole prefix in one span).

Positions (what the pretraining used, the slot's padding skipped):
  rope_dims 1   valid tokens count 0, 1, 2, ... from `position_offset` (PaliGemma counts from 1).
  rope_dims 3   Qwen2-VL's multimodal rotary positions, [3, ..., P] (temporal, height, width): a text token at
                counter c is (c, c, c); the image grid's token (r, col) is (s, s + r, s + col) with s the counter at
                the image, which then advances by max(rows, cols). Actions continue the temporal axis like text:
                (c, c, c).

Attention over the prefix: causal over valid keys, plus the spans; every query sees itself (a padding key is seen
by itself only), so no softmax row is empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

SOURCES = ('fixed', 'image', 'text', 'state')


@dataclass(frozen=True)
class Segment:
    name: str
    length: int
    source: str
    span: Optional[str] = None  # segments sharing a span attend to each other bidirectionally
    ids: tuple = field(default=())  # source 'fixed': the template's token ids

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f'segment {self.name!r}: source must be one of {SOURCES}, got {self.source!r}')
        if not isinstance(self.length, int) or self.length <= 0:
            raise ValueError(f'segment {self.name!r}: length must be a positive integer, got {self.length!r}')
        if (self.source == 'fixed') != bool(self.ids) or (self.ids and len(self.ids) != self.length):
            raise ValueError(f'segment {self.name!r}: a fixed segment holds one id per slot, others none '
                             f'({len(self.ids)} ids, {self.length} slots)')

    def to_dict(self) -> dict:
        return {'name': self.name, 'length': self.length, 'source': self.source,
                **({'span': self.span} if self.span else {}), **({'ids': list(self.ids)} if self.ids else {})}


@dataclass(frozen=True)
class PromptLayout:
    segments: tuple
    rope_dims: int = 1
    position_offset: int = 0
    image_grid: tuple = ()  # (rows, cols) of the image tokens (rope_dims 3)
    slot_format: str = '{}'  # the text the slot tokenizes (no special tokens added): PaliGemma '{}\n'
    offsets: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        segs = tuple(s if isinstance(s, Segment) else Segment(s['name'], int(s['length']), s['source'],
                                                              s.get('span'), tuple(s.get('ids', ())))
                     for s in self.segments)
        object.__setattr__(self, 'segments', segs)
        names = [s.name for s in segs]
        counts = {k: sum(s.source == k for s in segs) for k in SOURCES}
        if len(set(names)) != len(names):
            raise ValueError(f'segment names must be unique, got {names}')
        if counts['image'] != 1 or counts['text'] != 1 or counts['state'] > 1:
            raise ValueError(f'a VLM prompt holds exactly one image and one text segment (and at most one state), '
                             f'got {counts}')
        if counts['state'] and segs[-1].source != 'state':
            raise ValueError('the state segment must be the last one')
        if not isinstance(self.slot_format, str) or self.slot_format.count('{}') != 1:
            raise ValueError(f"slot_format must hold one '{{}}' for the instruction, got {self.slot_format!r}")
        if self.rope_dims not in (1, 3):
            raise ValueError(f'rope_dims must be 1 or 3, got {self.rope_dims}')
        offsets, start = {}, 0
        for s in segs:
            offsets[s.name] = slice(start, start + s.length)
            start += s.length
        object.__setattr__(self, 'offsets', offsets)
        if self.rope_dims == 3:
            grid = tuple(int(g) for g in self.image_grid)
            if len(grid) != 2 or grid[0] * grid[1] != self.segment('image').length:
                raise ValueError(f'3-D positions need image_grid (rows, cols) with rows * cols = the image tokens '
                                 f'({self.segment("image").length}), got {self.image_grid}')
            object.__setattr__(self, 'image_grid', grid)

    # --- sizes ------------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return int(sum(s.length for s in self.segments))

    def segment(self, name_or_source: str) -> Segment:
        """The segment of that name, else the first of that source."""
        for s in self.segments:
            if s.name == name_or_source:
                return s
        return next(s for s in self.segments if s.source == name_or_source)

    def span_of(self, name_or_source: str) -> tuple[int, int]:
        sl = self.offsets[self.segment(name_or_source).name]
        return sl.start, sl.stop

    @property
    def n_image_tokens(self) -> int:
        return self.segment('image').length

    @property
    def slot_len(self) -> int:
        return self.segment('text').length

    @property
    def has_state(self) -> bool:
        return any(s.source == 'state' for s in self.segments)

    @property
    def instruction_len(self) -> int:
        """Leading slots that depend on the instruction (and fixed template ids) alone, so their K/V can be kept
        while the instruction does not change: up to the end of the text segment when no image or state token comes
        before it and no span joins it to a later segment (PaliGemma's prefix-LM); else 0."""
        end = 0
        for s in self.segments:
            if s.source in ('image', 'state'):
                return 0
            end += s.length
            if s.source == 'text':
                later = {t.span for t in self.segments[self.segments.index(s) + 1:]}
                return 0 if any(t.span and t.span in later for t in self.segments[:self.segments.index(s) + 1]) \
                    else end
        return 0

    # --- per-sample arrays ------------------------------------------------------------------------------------
    def valid(self, text_valid: np.ndarray) -> np.ndarray:
        """text_valid [..., Lt] bool -> valid [..., P]: every slot but the instruction's padding."""
        text_valid = np.asarray(text_valid, dtype=bool)
        if text_valid.shape[-1] != self.slot_len:
            raise ValueError(f'text_valid has {text_valid.shape[-1]} slots, the instruction slot {self.slot_len}')
        out = np.ones(text_valid.shape[:-1] + (self.length,), dtype=bool)
        out[..., self.offsets[self.segment('text').name]] = text_valid
        return out

    def template_ids(self, text_ids: np.ndarray, fill: int = 0) -> np.ndarray:
        """Token ids [..., P]: template ids, the instruction slot, `fill` at image and state slots (tests)."""
        text_ids = np.asarray(text_ids, dtype=np.int64)
        parts = []
        for s in self.segments:
            if s.source == 'fixed':
                parts.append(np.broadcast_to(np.asarray(s.ids, np.int64), text_ids.shape[:-1] + (s.length,)))
            elif s.source == 'text':
                parts.append(text_ids)
            else:
                parts.append(np.full(text_ids.shape[:-1] + (s.length,), fill, dtype=np.int64))
        return np.concatenate(parts, axis=-1)

    def positions(self, valid: np.ndarray) -> np.ndarray:
        """valid [..., P] -> position ids [..., P] ([3, ..., P] with rope_dims 3) int64; padding gets 0."""
        valid = np.asarray(valid, dtype=bool)
        advance, base = self._base()
        # the counter before each token: the template's (an empty slot) + the valid slot tokens before it
        slot = np.zeros(valid.shape, dtype=np.int64)
        sl = self.offsets[self.segment('text').name]
        slot[..., sl] = valid[..., sl]
        before = np.cumsum(slot, axis=-1) - slot  # [..., P]
        pos = (base.reshape((self.rope_dims,) + (1,) * (valid.ndim - 1) + (-1,)) + before) * valid
        return pos if self.rope_dims == 3 else pos[0]

    def next_position(self, valid: np.ndarray) -> np.ndarray:
        """valid [..., P] -> the position of the first token after the prefix [...] int64."""
        valid = np.asarray(valid, dtype=bool)
        advance, _ = self._base()
        n_slot = valid[..., self.offsets[self.segment('text').name]].sum(-1)
        return (int(advance.sum()) + self.position_offset + n_slot).astype(np.int64)

    def action_positions(self, valid: np.ndarray, first: int, n: int) -> np.ndarray:
        """Positions of action tokens first .. first+n-1 after a prefix with validity valid [P] -> [n] ([3, n])."""
        pos = int(self.next_position(valid)) + first + np.arange(n, dtype=np.int64)
        return np.broadcast_to(pos, (3, n)).copy() if self.rope_dims == 3 else pos

    def attention(self, valid: np.ndarray) -> np.ndarray:
        """valid [..., P] -> [..., P, P] bool (query, key): causal + spans over valid keys, and the diagonal."""
        valid = np.asarray(valid, dtype=bool)
        return (self.rule() & valid[..., None, :]) | np.eye(self.length, dtype=bool)

    def rule(self) -> np.ndarray:
        """[P, P] bool: who may see whom before validity (causal + the spans)."""
        p = self.length
        rule = np.tril(np.ones((p, p), dtype=bool))
        for span in {s.span for s in self.segments if s.span}:
            member = np.zeros(p, dtype=bool)
            for s in self.segments:
                if s.span == span:
                    member[self.offsets[s.name]] = True
            rule |= member[:, None] & member[None, :]
        return rule

    def position_table(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The constants of `positions` for a traced (torch) version: base [R, P] (an empty slot), the slot's
        indicator [P], and the next position with an empty slot. positions = (base + valid slot tokens before)
        * valid; next = that + valid slot tokens."""
        advance, base = self._base()
        slot = np.zeros(self.length, dtype=bool)
        slot[self.offsets[self.segment('text').name]] = True
        return base, slot, int(advance.sum()) + self.position_offset

    # --- helpers ----------------------------------------------------------------------------------------------
    def _base(self) -> tuple[np.ndarray, np.ndarray]:
        """(how far each token advances the counter [P], base positions [R, P] with an empty instruction slot)."""
        advance, base = [], []
        counter = self.position_offset
        for s in self.segments:
            if s.source == 'image' and self.rope_dims == 3:
                rows, cols = self.image_grid
                r, c = np.divmod(np.arange(s.length), cols)
                base.append(np.stack([np.full(s.length, counter), counter + r, counter + c]))  # [3, n]
                step = np.zeros(s.length, dtype=np.int64)
                step[-1] = max(rows, cols)  # the image advances the counter by max(rows, cols)
                advance.append(step)
                counter += max(rows, cols)
            elif s.source == 'text':  # an empty slot sits at the counter; `before` adds its valid tokens
                base.append(np.full((self.rope_dims, s.length), counter))
                advance.append(np.zeros(s.length, dtype=np.int64))
            else:
                base.append(np.broadcast_to(counter + np.arange(s.length), (self.rope_dims, s.length)))
                advance.append(np.ones(s.length, dtype=np.int64))
                counter += s.length
        return np.concatenate(advance), np.concatenate(base, axis=1).astype(np.int64)

    # --- persistence ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {'segments': [s.to_dict() for s in self.segments], 'rope_dims': self.rope_dims,
                'position_offset': self.position_offset, 'image_grid': list(self.image_grid),
                'slot_format': self.slot_format}

    @classmethod
    def from_dict(cls, d: dict) -> 'PromptLayout':
        known = {'segments', 'rope_dims', 'position_offset', 'image_grid', 'slot_format'}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f'prompt layout: unknown keys {unknown}')
        return cls(segments=tuple(d['segments']), rope_dims=int(d.get('rope_dims', 1)),
                   position_offset=int(d.get('position_offset', 0)), image_grid=tuple(d.get('image_grid', ())),
                   slot_format=d.get('slot_format', '{}'))
