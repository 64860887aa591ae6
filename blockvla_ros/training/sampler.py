"""Data order as a pure function of the step: resuming at step s reproduces the batches of an uninterrupted run.

The sample stream is the concatenation of per-epoch permutations (seeded by (seed, epoch)). Optimizer step s
consumes stream positions [s*G, (s+1)*G) with G the global batch, laid out as [grad_accum, world, micro]:
process r at micro-step m takes row [m, r]. So one process with grad_accum=2 sees exactly the micro-batches that
two processes with grad_accum=1 see, and nothing but the step needs saving.
"""
from __future__ import annotations

import numpy as np


class StepBatchSampler:
    """Yields this process's micro-batches (lists of dataset indices) for steps [start, stop)."""

    def __init__(self, n: int, global_batch: int, world: int, rank: int, accum: int, seed: int, start: int,
                 stop: int):
        if n <= 0:
            raise ValueError('the training set has no windows')
        if global_batch % (world * accum):
            raise ValueError(f'train.batch_size {global_batch} must be divisible by processes x grad_accum = '
                             f'{world} x {accum}')
        self.n, self.G, self.world, self.rank, self.accum = n, global_batch, world, rank, accum
        self.micro = global_batch // (world * accum)
        self.seed, self.start, self.stop = seed, start, stop
        self._perms: dict = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, 0xDA7A, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int, micro_step: int) -> list:
        """Dataset indices of (step, micro_step) for this rank."""
        first = step * self.G + (micro_step * self.world + self.rank) * self.micro
        pos = np.arange(first, first + self.micro)
        return [int(self._perm(int(p // self.n))[p % self.n]) for p in pos]

    def epoch_at(self, step: int) -> float:
        return step * self.G / self.n

    def __iter__(self):
        for step in range(self.start, self.stop):
            for m in range(self.accum):
                yield self.indices(step, m)

    def __len__(self) -> int:
        return max(self.stop - self.start, 0) * self.accum


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, runs and platforms)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)
