"""PromptLayout: a pretrained VLM's prompt as fixed segments, with its position ids and prefix attention.

Pure numpy (the runtime uses it without torch). A VLM was pretrained on one prompt format; the policy keeps it, with
the instruction in a fixed-length, left-padded slot so every shape is static:

    PaliGemma   [image x256] <bos> [instruction + "\\n"]                                       (prefix-LM)
    SmolVLM2    <|im_start|>User:<fake><global-img> [image x64] <fake> [instruction]
                <end_of_utterance>\\nAssistant:
    Qwen2-VL    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<|vision_start|> [image xN]
                <|vision_end|> [instruction] <|im_end|>\\n<|im_start|>assistant\\n              (3-D positions)

and then an optional proprioceptive state token. Action tokens follow the prefix.

Segments: 'tokens' (fixed template ids), 'image' (the vision part's output tokens), 'instruction' (the slot; its
padding is never attended and takes no position) and 'state'.

Positions (what the pretraining used, the slot's padding skipped):
  1d      valid tokens count 0, 1, 2, ... from `position_offset` (PaliGemma counts from 1).
  mrope   Qwen2-VL's multimodal rotary positions, [3, N, T] (temporal, height, width): a text token at counter c
          is (c, c, c); the image grid's token (r, col) is (s, s + r, s + col) with s the counter at the image,
          which then advances by max(grid_h, grid_w). Actions continue the temporal axis like text: (c, c, c).

Prefix attention (`attention`):
  causal         token i sees valid prefix tokens j <= i (Idefics3/SmolVLM, Qwen2-VL);
  bidirectional  every prefix token sees every valid prefix token (PaliGemma's prefix-LM: image + prompt).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SEGMENT_KINDS = ('tokens', 'image', 'instruction', 'state')
ATTENTIONS = ('causal', 'bidirectional')
ROPES = ('1d', 'mrope')


@dataclass(frozen=True)
class Segment:
    kind: str
    length: int
    ids: tuple = ()  # the template's token ids ('tokens' only)

    def __post_init__(self):
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f'segment kind must be one of {SEGMENT_KINDS}, got {self.kind!r}')
        if not isinstance(self.length, int) or self.length < 0:
            raise ValueError(f'segment length must be an integer >= 0, got {self.length!r}')
        if self.kind == 'tokens' and len(self.ids) != self.length:
            raise ValueError(f'a tokens segment of length {self.length} holds {len(self.ids)} ids')
        if self.kind != 'tokens' and self.ids:
            raise ValueError(f'only tokens segments hold ids, not {self.kind!r}')


@dataclass(frozen=True)
class PromptLayout:
    segments: tuple
    attention: str = 'causal'
    rope: str = '1d'
    position_offset: int = 0
    image_grid: tuple = ()  # (rows, cols) of the image tokens (mrope)
    slot_format: str = '{}'  # the text the slot tokenizes (no special tokens added): PaliGemma '{}\n'
    kinds: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        segs = tuple(s if isinstance(s, Segment) else Segment(s['kind'], int(s['length']), tuple(s.get('ids', ())))
                     for s in self.segments)
        object.__setattr__(self, 'segments', segs)
        counts = {k: sum(s.kind == k for s in segs) for k in SEGMENT_KINDS}
        if counts['image'] != 1 or counts['instruction'] != 1 or counts['state'] > 1:
            raise ValueError(f'a prompt layout holds exactly one image and one instruction segment (and at most one '
                             f'state), got {counts}')
        if counts['state'] and segs[-1].kind != 'state':
            raise ValueError('the state segment must be the last one')
        if self.attention not in ATTENTIONS:
            raise ValueError(f'attention must be one of {ATTENTIONS}, got {self.attention!r}')
        if not isinstance(self.slot_format, str) or self.slot_format.count('{}') != 1:
            raise ValueError(f"slot_format must hold one '{{}}' for the instruction, got {self.slot_format!r}")
        if self.rope not in ROPES:
            raise ValueError(f'rope must be one of {ROPES}, got {self.rope!r}')
        if self.rope == 'mrope':
            grid = tuple(int(g) for g in self.image_grid)
            if len(grid) != 2 or grid[0] * grid[1] != self.span('image')[1] - self.span('image')[0]:
                raise ValueError(f'mrope needs image_grid (rows, cols) with rows * cols = the image tokens '
                                 f'({self.n_image_tokens}), got {self.image_grid}')
            object.__setattr__(self, 'image_grid', grid)
        object.__setattr__(self, 'kinds', np.concatenate(
            [np.full(s.length, SEGMENT_KINDS.index(s.kind), dtype=np.int64) for s in segs]))

    # --- sizes ------------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return int(sum(s.length for s in self.segments))

    def span(self, kind: str) -> tuple[int, int]:
        """[start, end) of the (first) segment of `kind`."""
        start = 0
        for s in self.segments:
            if s.kind == kind:
                return start, start + s.length
            start += s.length
        raise KeyError(f'no {kind!r} segment in this layout')

    @property
    def n_image_tokens(self) -> int:
        a, b = self.span('image')
        return b - a

    @property
    def slot_len(self) -> int:
        a, b = self.span('instruction')
        return b - a

    @property
    def has_state(self) -> bool:
        return any(s.kind == 'state' for s in self.segments)

    @property
    def n_rope(self) -> int:
        """Leading dimension of the position ids: 3 for mrope, 1 otherwise."""
        return 3 if self.rope == 'mrope' else 1

    # --- per-sample arrays ------------------------------------------------------------------------------------
    def template_ids(self, slot_ids: np.ndarray, fill: int = 0) -> np.ndarray:
        """Token ids [N, P]: template ids, the instruction slot, `fill` at image and state positions.

        slot_ids int [N, Lt] (left-padded)."""
        slot_ids = self._slot(slot_ids, 'slot_ids')
        n = slot_ids.shape[0]
        parts = []
        for s in self.segments:
            if s.kind == 'tokens':
                parts.append(np.broadcast_to(np.asarray(s.ids, dtype=np.int64), (n, s.length)))
            elif s.kind == 'instruction':
                parts.append(slot_ids.astype(np.int64))
            else:
                parts.append(np.full((n, s.length), fill, dtype=np.int64))
        return np.concatenate(parts, axis=1)

    def valid(self, slot_valid: np.ndarray) -> np.ndarray:
        """bool [N, P]: every token but the instruction slot's padding."""
        slot_valid = self._slot(slot_valid, 'slot_valid').astype(bool)
        a, b = self.span('instruction')
        out = np.ones((slot_valid.shape[0], self.length), dtype=bool)
        out[:, a:b] = slot_valid
        return out

    def positions(self, slot_valid: np.ndarray, n_actions: int = 0, copies: int = 0) -> np.ndarray:
        """int64 [R, N, P + copies * n_actions] (R = n_rope): prefix positions, then each action copy continuing
        at the next position (copies share positions, as the training sequence's noisy and clean copies do).
        Padding gets position 0 (it is never attended)."""
        valid = self.valid(slot_valid)  # [N, P]
        steps, base = self._base()
        # a token's counter: the template counter (empty slot) + the valid slot tokens before it
        a, b = self.span('instruction')
        slot = np.zeros_like(valid)
        slot[:, a:b] = valid[:, a:b]
        before = np.cumsum(slot, axis=1) - slot  # [N, P] valid slot tokens strictly before each token
        pos = (base[:, None, :] + before[None]) * valid[None]  # [R, N, P]
        nxt = self.next_position(slot_valid)  # [N]
        act = nxt[:, None] + np.arange(n_actions)[None]  # [N, L]
        acts = np.broadcast_to(act[None], (self.n_rope,) + act.shape)  # [R, N, L]
        return np.concatenate([pos] + [acts] * copies, axis=2).astype(np.int64)

    def next_position(self, slot_valid: np.ndarray) -> np.ndarray:
        """int64 [N]: the position of the first token after the prefix (the first action token)."""
        slot_valid = self._slot(slot_valid, 'slot_valid').astype(bool)
        steps, base = self._base()
        return (int(steps.sum()) + self.position_offset + slot_valid.sum(1)).astype(np.int64)

    def attention_mask(self, slot_valid: np.ndarray) -> np.ndarray:
        """bool [N, P, P] (query, key) over the prefix: `attention`, valid keys only; a padding query sees itself."""
        valid = self.valid(slot_valid)  # [N, P]
        p = self.length
        rule = np.tril(np.ones((p, p), dtype=bool)) if self.attention == 'causal' else np.ones((p, p), dtype=bool)
        return (rule[None] & valid[:, None, :]) | np.eye(p, dtype=bool)[None]

    # --- helpers ----------------------------------------------------------------------------------------------
    def _slot(self, x, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.slot_len:
            raise ValueError(f'{name} must be [N, {self.slot_len}] (the instruction slot), got {x.shape}')
        return x

    def _base(self) -> tuple[np.ndarray, np.ndarray]:
        """(how far each token advances the counter [P], base positions [R, P] with an empty slot)."""
        steps, base = [], []
        counter = self.position_offset
        for s in self.segments:
            if s.kind == 'image' and self.rope == 'mrope':
                rows, cols = self.image_grid
                r, c = np.divmod(np.arange(s.length), cols)
                base.append(np.stack([np.full(s.length, counter), counter + r, counter + c]))  # [3, n]
                step = np.zeros(s.length, dtype=np.int64)
                step[-1] = max(rows, cols)  # the whole image advances the counter by max(rows, cols)
                steps.append(step)
                counter += max(rows, cols)
            elif s.kind == 'instruction':  # an empty slot: its tokens sit at the counter, advanced by `before`
                base.append(np.full((self.n_rope, s.length), counter))
                steps.append(np.zeros(s.length, dtype=np.int64))
            else:
                base.append(np.broadcast_to(counter + np.arange(s.length), (self.n_rope, s.length)))
                steps.append(np.ones(s.length, dtype=np.int64))
                counter += s.length
        return np.concatenate(steps), np.concatenate(base, axis=1).astype(np.int64)

    # --- persistence ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {'segments': [{'kind': s.kind, 'length': s.length, **({'ids': list(s.ids)} if s.ids else {})}
                             for s in self.segments],
                'attention': self.attention, 'rope': self.rope, 'position_offset': self.position_offset,
                'image_grid': list(self.image_grid), 'slot_format': self.slot_format}

    @classmethod
    def from_dict(cls, d: dict) -> 'PromptLayout':
        known = {'segments', 'attention', 'rope', 'position_offset', 'image_grid', 'slot_format'}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f'prompt layout: unknown keys {unknown}')
        return cls(segments=tuple(d['segments']), attention=d.get('attention', 'causal'), rope=d.get('rope', '1d'),
                   position_offset=int(d.get('position_offset', 0)), image_grid=tuple(d.get('image_grid', ())),
                   slot_format=d.get('slot_format', '{}'))
