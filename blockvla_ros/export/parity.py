"""Parity of an exported engine against the torch reference on random observations.

Every decoder is run on both engines with tracing on; each graph call's logits are compared (max abs diff) and
the decoded tokens must be identical. Instructions repeat across observations, so the reused-instruction-K/V
path of the engines is exercised too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..runtime.decoding import Decoder

log = logging.getLogger(__name__)

WORDS = ('pick', 'up', 'the', 'red', 'blue', 'green', 'block', 'cup', 'and', 'place', 'it', 'on', 'plate', 'left',
         'right', 'of', 'push', 'open', 'drawer', 'close', 'a', 'bowl', 'put', 'in', 'stack', 'slowly')


class ExportParityError(RuntimeError):
    """The exported graphs do not reproduce the torch model within tolerance."""


@dataclass
class ParityReport:
    engine: str
    samples: int
    decoders: list
    max_abs_diff: float = 0.0
    tokens_equal: bool = True
    graph_calls: int = 0
    mismatches: list = field(default_factory=list)  # (sample, decoder) with different tokens

    def to_dict(self) -> dict:
        return {'engine': self.engine, 'samples': self.samples, 'decoders': list(self.decoders),
                'max_abs_diff': float(self.max_abs_diff), 'tokens_equal': bool(self.tokens_equal),
                'graph_calls': self.graph_calls, 'mismatches': [list(m) for m in self.mismatches]}


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
                    decoders=('blockdiff', 'ar', 'fulldiff')) -> ParityReport:
    report = ParityReport(engine=name, samples=len(observations), decoders=list(decoders))
    for i, (image, text, state) in enumerate(observations):
        prefix = preprocessor(image, text, state)
        for dec in decoders:
            a = Decoder(config, dec)(reference, prefix, trace=True)
            b = Decoder(config, dec)(engine, prefix, trace=True)
            if not np.array_equal(a.tokens, b.tokens):
                report.tokens_equal = False
                report.mismatches.append((i, dec))
            for (pa, _, la), (pb, _, lb) in zip(a.trace, b.trace):
                if pa != pb or la.shape != lb.shape:
                    report.tokens_equal = False
                    break
                report.max_abs_diff = max(report.max_abs_diff, float(np.abs(la - lb).max()))
                report.graph_calls += 1
    return report


def require_parity(report: ParityReport, tolerance: float) -> None:
    if not report.tokens_equal or not report.max_abs_diff <= tolerance:
        raise ExportParityError(
            f'{report.engine} does not match torch: max |logits diff| = {report.max_abs_diff:.3g} (tolerance '
            f'{tolerance:g}), tokens equal: {report.tokens_equal} (mismatches (sample, decoder): '
            f'{report.mismatches[:5]}) over {report.samples} observations')
    log.info('parity %s vs torch: max |logits diff| %.3g over %d graph calls, tokens identical',
             report.engine, report.max_abs_diff, report.graph_calls)
