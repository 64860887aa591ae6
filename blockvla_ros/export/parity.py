"""Parity of an exported engine against the torch reference on random observations.

Two measurements per decoder and observation:
- lock step: one decode drives both engines with identical calls (the reference's choices, so it is also the
  reference's own decode), and every call's logits are compared on identical inputs (max abs diff): this is what
  the tolerance bounds;
- free run: each engine decodes on its own; the fraction of equal tokens is the token agreement (a random
  model's near-tied confidences can flip one unmasking order without any real difference, so for fp32 it is
  reported; lower precisions are judged by it).
Instructions repeat across observations, so the reused-instruction-K/V path of the engines is exercised too.

The exporter never holds the torch reference and the new folder's session at once (each is a full copy of the
weights): `record_reference` runs the reference's side of every lock-step decode first and keeps its calls and
logits (small: [n, n_bins] per call), the reference is dropped, and `compare_recorded` replays them: a `Playback`
stands in for the reference in `compare_engines`, so the engine sees exactly the calls, in the order, and is judged
exactly as it would be against the live reference.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..runtime.decoding import Decoder

log = logging.getLogger(__name__)

WORDS = ('pick', 'up', 'the', 'red', 'blue', 'green', 'block', 'cup', 'and', 'place', 'it', 'on', 'plate', 'left',
         'right', 'of', 'push', 'open', 'drawer', 'close', 'a', 'bowl', 'put', 'in', 'stack', 'slowly')
DECODERS = ('blockdiff', 'ar', 'fulldiff')


class ExportParityError(RuntimeError):
    """The exported graphs do not reproduce the torch model within tolerance."""


@dataclass
class ParityReport:
    engine: str
    samples: int
    decoders: list
    max_abs_diff: float = 0.0  # lock step, over every call
    graph_calls: int = 0  # lock-step calls compared
    tokens: int = 0  # free-run tokens compared
    agreeing: int = 0  # ... of which equal
    mismatches: list = field(default_factory=list)  # (sample, decoder) whose free-run chunks differ

    @property
    def token_agreement(self) -> float:
        return self.agreeing / max(self.tokens, 1)

    @property
    def tokens_equal(self) -> bool:
        return self.agreeing == self.tokens

    def to_dict(self) -> dict:
        return {'engine': self.engine, 'samples': self.samples, 'decoders': list(self.decoders),
                'max_abs_diff': float(self.max_abs_diff), 'graph_calls': self.graph_calls,
                'token_agreement': float(self.token_agreement), 'tokens_equal': bool(self.tokens_equal),
                'mismatches': [list(m) for m in self.mismatches]}


def _to_decoder(logits):
    """The reference's logits as a lock-step decode hands them to the decoder (live in LockStep, taped in Recorder)."""
    return np.asarray(logits, np.float64).astype(np.float32)


class LockStep:
    """An engine that forwards every call to `reference` and `engine` and answers with the reference's logits."""

    def __init__(self, reference, engine):
        self.reference, self.engine = reference, engine
        self.max_abs_diff, self.calls = 0.0, 0

    def _compare(self, a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ExportParityError(f'logits shapes differ: {a.shape} vs {b.shape}')
        self.max_abs_diff = max(self.max_abs_diff, float(np.abs(a - b).max()) if a.size else 0.0)
        if not np.isfinite(b).all():
            self.max_abs_diff = float('inf')
        self.calls += 1
        return _to_decoder(a)

    def prefill(self, prefix):
        return self._compare(self.reference.prefill(prefix), self.engine.prefill(prefix))

    def prefill_step(self, prefix, tokens, commit=0, block_size=1, rows=None):
        kw = dict(commit=commit, block_size=block_size, rows=rows)
        (a0, a1), (b0, b1) = (self.reference.prefill_step(prefix, tokens, **kw),
                              self.engine.prefill_step(prefix, tokens, **kw))
        return self._compare(a0, b0), self._compare(a1, b1)

    def step(self, tokens, commit=0, block_size=1, rows=None):
        return self._compare(self.reference.step(tokens, commit=commit, block_size=block_size, rows=rows),
                             self.engine.step(tokens, commit=commit, block_size=block_size, rows=rows))


def _copy(x):
    return x.copy() if isinstance(x, np.ndarray) else x


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, '__dict__') and type(a) is type(b):  # PrefixInputs
        return vars(a).keys() == vars(b).keys() and all(_same(v, vars(b)[k]) for k, v in vars(a).items())
    return a == b


class Recorder:
    """The reference's side of `LockStep`, taped: answers the decode as LockStep would (the reference's logits) and
    keeps each call (method, arguments) with the reference's raw answer, for a `Playback` after it is gone."""

    def __init__(self, reference):
        self.reference, self.tape = reference, []

    def _keep(self, call, out):
        if isinstance(out, tuple):
            self.tape.append((call, tuple(np.array(o, copy=True) for o in out)))
            return tuple(_to_decoder(o) for o in out)
        self.tape.append((call, np.array(out, copy=True)))
        return _to_decoder(out)

    def prefill(self, prefix):
        return self._keep(('prefill', (prefix,), {}), self.reference.prefill(prefix))

    def prefill_step(self, prefix, tokens, commit=0, block_size=1, rows=None):
        kw = dict(commit=commit, block_size=block_size, rows=_copy(rows))
        return self._keep(('prefill_step', (prefix, tokens.copy()), kw),
                          self.reference.prefill_step(prefix, tokens, commit=commit, block_size=block_size, rows=rows))

    def step(self, tokens, commit=0, block_size=1, rows=None):
        kw = dict(commit=commit, block_size=block_size, rows=_copy(rows))
        return self._keep(('step', (tokens.copy(),), kw),
                          self.reference.step(tokens, commit=commit, block_size=block_size, rows=rows))


class Playback:
    """A recorded reference: answers each call with the taped logits, after checking it is the taped call."""

    def __init__(self, tape):
        self.tape, self.pos = tape, 0

    def _next(self, method, args, kw):
        if self.pos >= len(self.tape):
            raise ExportParityError(f'parity playback: {method} after the {len(self.tape)} recorded calls')
        (m, a, k), out = self.tape[self.pos]
        if m != method or not _same(list(a), list(args)) or k.keys() != kw.keys() or \
                not all(_same(v, kw[n]) for n, v in k.items()):
            raise ExportParityError(f'parity playback: call {self.pos} is {method}, not the recorded {m} (or other '
                                    'arguments): the decode is not deterministic')
        self.pos += 1
        return out

    def prefill(self, prefix):
        return self._next('prefill', [prefix], {})

    def prefill_step(self, prefix, tokens, commit=0, block_size=1, rows=None):
        return self._next('prefill_step', [prefix, tokens], dict(commit=commit, block_size=block_size, rows=rows))

    def step(self, tokens, commit=0, block_size=1, rows=None):
        return self._next('step', [tokens], dict(commit=commit, block_size=block_size, rows=rows))


def random_observations(config, stats, n: int, seed: int = 0, tokenizer=None) -> list:
    """n (image uint8 [S, S, 3], instruction, state | None); each instruction is used by two observations."""
    rng = np.random.default_rng(seed)
    obs, text = [], None
    for i in range(n):
        if i % 2 == 0:
            for _ in range(100):
                text = ' '.join(rng.choice(WORDS, size=int(rng.integers(2, 8))))
                try:
                    if tokenizer is None or tokenizer.encode(text):
                        break
                except ValueError:  # too long for max_text_tokens: draw a shorter one
                    continue
        image = rng.integers(0, 256, (config.image_size, config.image_size, 3), dtype=np.uint8)
        state = None
        if config.state_dim:
            low, high = np.asarray(stats.state_low), np.asarray(stats.state_high)
            state = rng.uniform(low, high).astype(np.float32)
        obs.append((image, text, state))
    return obs


def compare_engines(config, reference, engine, observations, preprocessor, name: str,
                    decoders=DECODERS) -> ParityReport:
    report = ParityReport(engine=name, samples=len(observations), decoders=list(decoders))
    lock = LockStep(reference, engine)
    for i, (image, text, state) in enumerate(observations):
        prefix = preprocessor(image, text, state)
        for dec in decoders:
            a = Decoder(config, dec)(lock, prefix).tokens  # driven by the reference: its own free run
            b = Decoder(config, dec)(engine, prefix).tokens
            report.tokens += a.size
            report.agreeing += int((a == b).sum())
            if not np.array_equal(a, b):
                report.mismatches.append((i, dec))
    report.max_abs_diff, report.graph_calls = lock.max_abs_diff, lock.calls
    return report


def record_reference(config, reference, observations, preprocessor, decoders=DECODERS) -> list:
    """The reference's side of `compare_engines` (same observations, decoders, order) -> its tape (for
    `compare_recorded`); the reference may be released afterwards."""
    rec = Recorder(reference)
    for image, text, state in observations:
        prefix = preprocessor(image, text, state)
        for dec in decoders:
            Decoder(config, dec)(rec, prefix)
    return rec.tape


def compare_recorded(config, tape, engine, observations, preprocessor, name: str, decoders=DECODERS) -> ParityReport:
    """`compare_engines` against a reference recorded by `record_reference` on the same observations and decoders:
    the same report as against the live reference."""
    playback = Playback(tape)
    report = compare_engines(config, playback, engine, observations, preprocessor, name, decoders)
    if playback.pos != len(tape):
        raise ExportParityError(f'parity playback: {len(tape) - playback.pos} recorded calls were not replayed')
    return report


def require_parity(report: ParityReport, tolerance: float, min_agreement: float = 0.0) -> None:
    """Lock-step logits within `tolerance` (None: not checked) and free-run token agreement >= min_agreement."""
    if (tolerance is not None and not report.max_abs_diff <= tolerance) or report.token_agreement < min_agreement:
        raise ExportParityError(
            f'{report.engine} does not match torch: max |logits diff| = {report.max_abs_diff:.3g} over '
            f'{report.graph_calls} lock-step calls (tolerance {tolerance}), token agreement '
            f'{report.token_agreement:.3f} (required {min_agreement}; differing (sample, decoder): '
            f'{report.mismatches[:5]}) over {report.samples} observations')
    log.info('parity %s vs torch: max |logits diff| %.3g over %d calls, token agreement %.3f',
             report.engine, report.max_abs_diff, report.graph_calls, report.token_agreement)
