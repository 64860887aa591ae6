"""One decode loop for every decoder: prefill -> per block: refine steps -> commit.

    blockdiff         blocks of B tokens left to right; each starts all [MASK] and is refined in parallel
                      (<= steps_per_block passes), then one commit pass stores its exact K/V. The last block needs
                      no commit. NFE (fixed schedule) = 1 + n_blocks * (steps + 1) - 1.
    ar                one token per pass with the KV cache: NFE = L.
    fulldiff          the whole chunk is one block refined fulldiff_steps times over the cached prefix.
    fulldiff_nocache  the same, but the prefix is recomputed for every pass (the paper's baseline).

`known` tokens (real-time chunking: actions already sent to the robot while this chunk was computed) are placed
as already decoded and are never changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..model.config import BlockVLAConfig
from .engine import Engine, PrefixInputs


@dataclass
class DecodeResult:
    tokens: np.ndarray  # [L] int64
    nfe: int  # forward passes over the sequence (prefill counted; a recomputed prefix+chunk pass counts once)
    calls: int  # graph calls actually made
    steps: list = field(default_factory=list)  # refine passes per block
    trace: list = field(default_factory=list)  # (phase, tokens_in, logits) per call when tracing

    @property
    def tokens_per_nfe(self) -> float:
        return len(self.tokens) / max(self.nfe, 1)


def scheduled_counts(n_masked: int, steps: int) -> list:
    """Spread n_masked unmaskings over `steps` passes: base count each, remainder to the early passes."""
    base, rem = divmod(n_masked, steps)
    return [c for c in (base + (1 if s < rem else 0) for s in range(steps)) if c > 0]


def select_unmask(logits: np.ndarray, masked: np.ndarray, count: int, schedule: str,
                  threshold: float) -> np.ndarray:
    """Which masked slots to fill now: the `count` most confident, plus (threshold) all with p >= tau.

    logits [n, n_bins], masked [n] bool -> bool [n] (at least one slot, only masked slots).
    """
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z)
    conf = probs.max(-1) / probs.sum(-1)  # [n]: softmax probability of the argmax bin
    conf = np.where(masked, conf, -np.inf)
    n_masked = int(masked.sum())
    k = min(max(count, 1), n_masked)
    if schedule == 'threshold':
        k = max(k, int((conf >= threshold).sum()))
    order = np.argsort(-conf, kind='stable')[:k]
    chosen = np.zeros_like(masked)
    chosen[order] = True
    return chosen


class Decoder:
    """Runs one decoder variant over an Engine; variants are config values checked here, in one place."""

    def __init__(self, config: BlockVLAConfig, decoder: Optional[str] = None):
        self.config = config
        self.decoder = decoder or config.decoder
        if self.decoder not in ('blockdiff', 'ar', 'fulldiff', 'fulldiff_nocache'):
            raise ValueError(f'unknown decoder {self.decoder!r}')

    def __call__(self, engine: Engine, prefix: PrefixInputs, known: Optional[np.ndarray] = None,
                 trace: bool = False) -> DecodeResult:
        cfg = self.config
        L = cfg.n_action_tokens
        tokens = np.full(L, cfg.mask_token_id, dtype=np.int64)
        fixed = np.zeros(L, dtype=bool)
        if known is not None and len(known):
            known = np.asarray(known, dtype=np.int64).reshape(-1)
            if len(known) > L or known.min() < 0 or known.max() >= cfg.n_bins:
                raise ValueError(f'known tokens must be at most {L} values in [0, {cfg.n_bins})')
            tokens[:len(known)] = known
            fixed[:len(known)] = True
        res = DecodeResult(tokens=tokens, nfe=0, calls=0)
        self._trace = res.trace if trace else None
        if self.decoder == 'ar':
            self._ar(engine, prefix, tokens, fixed, res)
        elif self.decoder == 'blockdiff':
            boundary = self._call(engine.prefill, res, 'prefill', None, prefix)
            for b in range(cfg.n_blocks):
                sl = slice(b * cfg.block_size, (b + 1) * cfg.block_size)
                steps = self._refine(engine, res, tokens[sl], fixed[sl], boundary, cfg.steps_per_block, sl.start)
                res.steps.append(steps)
                if b < cfg.n_blocks - 1:  # commit pass: the finished block's exact K/V, and the next boundary
                    boundary = self._call(engine.step, res, 'commit', tokens[sl], tokens[sl], True)[-1]
        else:
            boundary = None
            if self.decoder == 'fulldiff':
                boundary = self._call(engine.prefill, res, 'prefill', None, prefix)
            nocache = prefix if self.decoder == 'fulldiff_nocache' else None
            res.steps.append(self._refine(engine, res, tokens, fixed, boundary, cfg.fulldiff_steps, 0, nocache))
        self._trace = None
        return res

    # --------------------------------------------------------------------------------------------------------
    def _call(self, fn, res: DecodeResult, phase: str, tokens_in, *args, nfe: int = 1):
        out = fn(*args)
        res.calls += 1
        res.nfe += nfe
        if self._trace is not None:
            self._trace.append((phase, None if tokens_in is None else tokens_in.copy(), np.array(out, copy=True)))
        return out

    def _predictions(self, logits: np.ndarray, boundary: Optional[np.ndarray]) -> np.ndarray:
        """Logits that predict each token of the step: 'next' shift reads position i-1 (boundary for i = 0)."""
        if self.config.logit_shift == 'same':
            return logits
        return np.concatenate([boundary[None], logits[:-1]], axis=0)  # [n, n_bins]

    def _refine(self, engine, res, block, fixed, boundary, max_steps, start, nocache_prefix=None) -> int:
        """Unmask `block` in place (a view into the chunk). Returns the refine passes used."""
        cfg = self.config
        masked = ~fixed & (block == cfg.mask_token_id)
        counts = scheduled_counts(int(masked.sum()), max_steps)
        steps = 0
        while masked.any():
            if nocache_prefix is not None:  # baseline: recompute the prefix, then the chunk (one NFE)
                boundary = self._call(engine.prefill, res, 'prefill', None, nocache_prefix, nfe=0)
            logits = self._call(engine.step, res, 'refine', block, block, False)
            pred = self._predictions(logits, boundary)
            count = counts[steps] if steps < len(counts) - 1 else int(masked.sum())  # last pass fills the rest
            chosen = select_unmask(pred, masked, count, cfg.schedule, cfg.threshold)
            block[chosen] = pred[chosen].argmax(-1)
            masked &= ~chosen
            steps += 1
        return steps

    def _ar(self, engine, prefix, tokens, fixed, res):
        logits = self._call(engine.prefill, res, 'prefill', None, prefix)
        for i in range(len(tokens)):
            if not fixed[i]:
                tokens[i] = int(np.argmax(logits))
            if i < len(tokens) - 1:
                logits = self._call(engine.step, res, 'ar', tokens[i:i + 1], tokens[i:i + 1], True)[0]
        res.steps = [1] * len(tokens)
