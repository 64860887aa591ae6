"""One decode loop for every decoder: prefill -> per block: refine passes, the first one carrying the commit.

    blockdiff         blocks of B tokens left to right; each starts all [MASK] and is refined in parallel
                      (<= steps_per_block passes). A finished block is committed (its exact K/V stored) by the next
                      block's first refine pass, which carries [block b-1 clean ; block b masks] (n = 2B,
                      block-causal inside the pass). The prefill is folded into the first block's first refine
                      pass: one backbone pass over [prefix ; block 0 masks] (`Engine.prefill_step`). NFE = sum of
                      refine passes (fixed schedule: blocks * steps). `fuse_commit=False` runs the commit as its own
                      pass (n = B; + blocks - 1 NFE); `fold_prefill=False` the prefill as its own pass (+ 1 NFE);
                      `masked_rows=False` asks every pass for the rows of all block tokens (same tokens; for A/Bs).
    ar                one token per pass with the KV cache, each pass committing the previous token: NFE = L (the
                      first token is read off the prefill, so nothing is folded into it).
    fulldiff          the whole chunk is one block refined fulldiff_steps times over the cached prefix (the prefill
                      folded into the first pass: NFE = passes).
    fulldiff_nocache  the same, but the prefix is recomputed for every pass (the paper's baseline).

Folding is exact: the prefix rows of the folded pass attend as the prefill's and never see an action token, the
action rows see the prefix and the block as the separate pass would (`runtime.pass_masks.prefix_action_mask`), and
only the prefix's (and carried finished blocks') K/V are written to the cache. The first engine call after the
prefill, whatever it is (a refine pass, with or without a carry, or a commit pass), is the one folded.

`known` tokens (real-time chunking: actions already sent to the robot while this chunk was computed) are placed
as already decoded and are never changed; whole known blocks (AR: known tokens) cost no pass of their own: they
are committed by the next pass. Every pass asks the engine for the logits of the rows it reads only (`rows`): a
refine pass the rows predicting the block tokens still masked (with the 'next' shift the row before each: a
block's second pass with 4 of its 8 tokens left asks for <= 4 rows, not 7), AR the last row; the engine computes no
other row past the last layer's K/V (model.graphs).
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
    nfe: int  # forward passes over the sequence (prefill counted; a prefix+chunk pass, folded or recomputed, once)
    calls: int  # engine calls actually made
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

    def __init__(self, config: BlockVLAConfig, decoder: Optional[str] = None, fuse_commit: bool = True,
                 fold_prefill: bool = True, masked_rows: bool = True):
        self.config = config
        self.decoder = decoder or config.decoder
        self.fuse_commit = bool(fuse_commit)
        self.fold_prefill = bool(fold_prefill)
        self.masked_rows = bool(masked_rows)
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
        self._prefix = None  # a prefill not run yet: the next step carries it (`_step`)
        if self.decoder == 'ar':
            self._ar(engine, prefix, tokens, fixed, res)
        elif self.decoder == 'blockdiff':
            self._blockdiff(engine, prefix, tokens, fixed, res)
        else:
            boundary = None
            if self.decoder == 'fulldiff':
                boundary = self._prefill(engine, res, prefix)
            nocache = prefix if self.decoder == 'fulldiff_nocache' else None
            res.steps.append(self._refine(engine, res, tokens, fixed, boundary, cfg.fulldiff_steps, nocache)[0])
        if self._prefix is not None:  # every token was known: no pass to fold the prefill into
            self._call(engine.prefill, res, 'prefill', None, self._prefix)
        self._trace = self._prefix = None
        return res

    # --------------------------------------------------------------------------------------------------------
    def _call(self, fn, res: DecodeResult, phase: str, tokens_in, *args, nfe: int = 1, **kwargs):
        out = fn(*args, **kwargs)
        res.calls += 1
        res.nfe += nfe
        if self._trace is not None:  # a folded pass: [the prefill's logits ; the step's]
            logits = np.concatenate([out[0][None], out[1]]) if isinstance(out, tuple) else np.array(out, copy=True)
            self._trace.append((phase, None if tokens_in is None else tokens_in.copy(), logits))
        return out

    def _prefill(self, engine, res: DecodeResult, prefix) -> Optional[np.ndarray]:
        """Run the prefill now (-> its logits), or, folding, leave it to the next `_step` (-> None)."""
        if self.fold_prefill:
            self._prefix = prefix
            return None
        return self._call(engine.prefill, res, 'prefill', None, prefix)

    def _step(self, engine, res: DecodeResult, phase: str, tokens, commit: int, block_size: int, rows: slice):
        """engine.step, or the pending prefill and it in one pass. -> (step logits, the prefill's logits or None)"""
        if self._prefix is None:
            return self._call(engine.step, res, phase, tokens, tokens, commit=commit, block_size=block_size,
                              rows=rows), None
        prefix, self._prefix = self._prefix, None
        boundary, logits = self._call(engine.prefill_step, res, 'prefill+' + phase, tokens, prefix, tokens,
                                      commit=commit, block_size=block_size, rows=rows)
        return logits, boundary

    def _rows(self, masked: np.ndarray, k: int) -> np.ndarray:
        """The rows of a pass over [k carried ; block] whose logits it reads: those predicting a block token that is
        still masked (masked [B] bool), int64 [m]. 'same' shift: token i's own row k + i; 'next': the row before it,
        k + i - 1 (the last carried token's for i = 0; without a carry that is the boundary, already known)."""
        idx = np.flatnonzero(masked)
        if self.config.logit_shift == 'same':
            return idx + k
        rows = idx + (k - 1)
        return rows[rows >= 0]

    def _predictions(self, logits: np.ndarray, boundary: Optional[np.ndarray], first_masked: bool, k: int) -> tuple:
        """The `_rows` logits of a pass -> (logits predicting each masked block token [m, n_bins], the boundary for
        the block's later passes): 'next' shift reads position i-1, the boundary for i = 0 (`first_masked`: token 0
        is masked). A block whose token 0 is decoded needs no boundary any more (None)."""
        if self.config.logit_shift == 'same':
            return logits, boundary
        if k:
            return logits, logits[0] if first_masked else None
        if first_masked:
            return np.concatenate([boundary[None], logits], axis=0), boundary  # [m, n_bins]
        return logits, boundary

    def _blockdiff(self, engine, prefix, tokens, fixed, res):
        cfg, B = self.config, self.config.block_size
        boundary = self._prefill(engine, res, prefix)
        pending = 0  # finished tokens (whole blocks) before the current block, not yet in the cache
        for b in range(cfg.n_blocks):
            sl = slice(b * B, (b + 1) * B)
            if pending and not self.fuse_commit and (~fixed[sl]).any():
                done = tokens[sl.start - pending:sl.start]
                boundary = self._step(engine, res, 'commit', done, pending, B, slice(pending - 1, pending))[0][-1]
                pending = 0
            steps, boundary = self._refine(engine, res, tokens[sl], fixed[sl], boundary, cfg.steps_per_block,
                                           carry=tokens[sl.start - pending:sl.start])
            if steps:
                pending = 0
            res.steps.append(steps)
            pending += B

    def _refine(self, engine, res, block, fixed, boundary, max_steps, nocache_prefix=None, carry=None):
        """Unmask `block` in place (a view into the chunk); the first pass also commits the `carry` tokens (finished
        blocks before it). -> (refine passes used, the boundary logits after the carry)."""
        cfg = self.config
        carry = np.zeros(0, np.int64) if carry is None else carry
        masked = ~fixed & (block == cfg.mask_token_id)
        counts = scheduled_counts(int(masked.sum()), max_steps)
        steps = 0
        while masked.any():
            if nocache_prefix is not None:  # baseline: recompute the prefix, then the chunk (one NFE)
                boundary = self._call(engine.prefill, res, 'prefill', None, nocache_prefix, nfe=0)
            k = len(carry) if steps == 0 else 0
            tokens_in = np.concatenate([carry, block]) if k else block
            asked = masked if self.masked_rows else np.ones_like(masked)
            logits, prefilled = self._step(engine, res, 'refine', tokens_in, k, cfg.block_size,
                                           self._rows(asked, k))
            boundary = boundary if prefilled is None else prefilled
            idx = np.flatnonzero(masked)  # [m]: the block tokens still masked, one prediction each
            pred, boundary = self._predictions(logits, boundary, bool(asked[0]), k)
            pred = pred if self.masked_rows else pred[idx]
            count = counts[steps] if steps < len(counts) - 1 else len(idx)  # last pass fills the rest
            chosen = select_unmask(pred, np.ones(len(idx), bool), count, cfg.schedule, cfg.threshold)
            block[idx[chosen]] = pred[chosen].argmax(-1)
            masked[idx[chosen]] = False
            steps += 1
        return steps, boundary

    def _ar(self, engine, prefix, tokens, fixed, res):
        logits = self._call(engine.prefill, res, 'prefill', None, prefix)
        i, L = 0, len(tokens)
        while i < L:
            j = i
            while j < L and fixed[j]:
                j += 1
            if j == i:  # predict token i, then commit it (its pass predicts token i + 1)
                tokens[i] = int(np.argmax(logits))
                j = i + 1
            if j < L:  # known tokens i..j-1 are committed by one pass
                logits = self._call(engine.step, res, 'ar', tokens[i:j], tokens[i:j], commit=j - i,
                                    rows=slice(j - i - 1, j - i))[-1]
            i = j
        res.steps = [1] * L
