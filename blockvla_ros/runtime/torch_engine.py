"""TorchEngine: the reference engine; runs the same graph modules the exporter traces (model.graphs)."""
from __future__ import annotations

import numpy as np

from .engine import Engine
from .tables import Tables


class TorchEngine(Engine):
    name = 'torch'

    def __init__(self, policy, device: str = 'cpu', reuse_instruction: bool = True):
        import torch

        from ..model.graphs import BackboneGraph, VisionGraph, past_inputs, tables

        self._torch = torch
        self.device = torch.device(device)
        self.policy = policy.to(self.device).eval()
        self.vision, self.backbone = VisionGraph(policy), BackboneGraph(policy)
        arrays = {k: v.numpy() for k, v in tables(policy).items()}
        super().__init__(policy.config, policy.kv_shape, Tables(arrays), reuse_instruction=reuse_instruction)
        self._past = past_inputs(self.cache.buffer)  # per-layer views: the graph reads the cache in place

    def _alloc(self, shape):
        return self._torch.zeros(shape, dtype=self._torch.float32, device=self.device)

    def _t(self, x):
        return self._torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def _vision(self, pixels):
        with self._torch.inference_mode():
            return self.vision(self._t(pixels)).float().cpu().numpy()

    def _backbone(self, embeds, positions, mask, rows):
        with self._torch.inference_mode():
            logits, new_kv = self.backbone(self._t(embeds), self._t(positions), self._t(mask), self._t(rows),
                                           self._past)
        return logits[0].float().cpu().numpy(), new_kv

    def synchronize(self) -> None:
        if self.device.type == 'cuda':
            self._torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        return {'engine': self.name, 'device': str(self.device), 'reuse_text_kv': self.reuse_instruction}
