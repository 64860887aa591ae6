"""TorchEngine: the reference engine; runs the same graph modules the exporter traces."""
from __future__ import annotations

import numpy as np

from .engine import Engine, PrefixInputs


class TorchEngine(Engine):
    name = 'torch'

    def __init__(self, policy, device: str = 'cpu'):
        import torch

        from ..model.graphs import PrefillGraph, StepGraph, VisionGraph

        self._torch = torch
        self.device = torch.device(device)
        self.policy = policy.to(self.device).eval()
        self.vision, self.prefill_graph, self.step_graph = VisionGraph(policy), PrefillGraph(policy), StepGraph(policy)
        super().__init__(policy.config, policy.kv_shape)

    def _alloc(self, shape):
        return self._torch.zeros(shape, dtype=self._torch.float32, device=self.device)

    def _t(self, x):
        return None if x is None else self._torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def _prefill(self, prefix: PrefixInputs):
        with self._torch.inference_mode():
            image_tokens = self.vision(self._t(prefix.pixels))
            logits, kv = self.prefill_graph(self._t(prefix.text_ids), self._t(prefix.text_valid), image_tokens,
                                            self._t(prefix.state))
        return logits[0].float().cpu().numpy(), kv

    def _step(self, tokens, positions):
        with self._torch.inference_mode():
            logits, new_kv = self.step_graph(self._t(tokens), self._t(positions), self.cache.buffer,
                                             self._t(self.cache.valid))
        return logits[0].float().cpu().numpy(), new_kv

    def describe(self) -> dict:
        return {'engine': self.name, 'device': str(self.device)}
