"""The small engine interface the decode loop drives: prefill(...) and step(...), plus the shared cache logic.

Backends (torch, onnxruntime, tensorrt) implement three graph calls on batch 1; positions, cache slots and
validity are handled here once.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..model.config import BlockVLAConfig
from .kv_cache import KVCache


@dataclass
class PrefixInputs:
    """One observation, preprocessed (see runtime.preprocess)."""

    pixels: np.ndarray  # [1, 3, S, S] float32, normalized
    text_ids: np.ndarray  # [1, Lt] int64, left-padded
    text_valid: np.ndarray  # [1, Lt] bool
    state: Optional[np.ndarray] = None  # [1, S] float32, normalized

    def prefix_valid(self, config: BlockVLAConfig) -> np.ndarray:
        """[P] bool in the prefix order of `config` (text, image, state; a VLM: its prompt layout)."""
        if config.is_vlm:
            return vlm_layout(config).valid(self.text_valid.reshape(-1))
        img = np.ones(config.n_image_tokens, dtype=bool)
        text = self.text_valid.reshape(-1).astype(bool)
        parts = [text, img] if config.prefix_order == 'text_first' else [img, text]
        if config.state_dim:
            parts.append(np.ones(1, dtype=bool))
        return np.concatenate(parts)


def vlm_layout(config: BlockVLAConfig):
    """The prompt layout of a VLM policy (model.vlm.layout, numpy)."""
    from ..model.vlm.layout import PromptLayout

    return PromptLayout.from_dict(config.vlm_layout)


class Engine(ABC):
    """Holds one KV cache; `prefill` starts a chunk, `step` evaluates n action tokens after the committed ones."""

    name = 'abstract'

    def __init__(self, config: BlockVLAConfig, kv_shape: tuple):
        self.config = config
        layers, kv_heads, head_dim = kv_shape
        self.cache = KVCache(self._alloc((layers, 2, kv_heads, config.max_seq_len, head_dim)), config.max_seq_len)
        self.n_valid_prefix = 0
        self.n_committed = 0
        self.layout = vlm_layout(config) if config.is_vlm else None  # its positions (PaliGemma 1-based, M-RoPE)
        self._prefix_valid = None

    # --- backend hooks --------------------------------------------------------------------------------------
    @abstractmethod
    def _alloc(self, shape: tuple):
        """A zeroed float32 cache buffer of `shape` in the backend's array type."""

    @abstractmethod
    def _prefill(self, prefix: PrefixInputs):
        """-> (logits np.float32 [n_bins] at the last prefix position, kv [layers, 2, kv_heads, P, head_dim])."""

    @abstractmethod
    def _step(self, tokens: np.ndarray, positions: np.ndarray):
        """tokens, positions int64 [1, n] -> (logits np.float32 [n, n_bins], new_kv [layers, 2, kv_heads, n, hd])."""

    # --- the interface the decode loop uses ---------------------------------------------------------------
    def prefill(self, prefix: PrefixInputs) -> np.ndarray:
        valid = prefix.prefix_valid(self.config)
        logits, kv = self._prefill(prefix)
        self.cache.set_prefix(kv, valid)
        self._prefix_valid = valid
        self.n_valid_prefix = int(valid.sum())
        self.n_committed = 0
        return logits

    def step(self, tokens: np.ndarray, commit: bool = False) -> np.ndarray:
        """Evaluate action tokens [n] at the next n action positions; on commit their K/V join the cache."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(1, -1)  # [n] -> [1, n]
        if self.layout is not None:  # [1, n], or [3, 1, n] for M-RoPE
            n = tokens.shape[1]
            positions = self.layout.action_positions(self._prefix_valid, self.n_committed, n)[..., None, :]
        else:
            start = self.n_valid_prefix + self.n_committed
            positions = np.arange(start, start + tokens.shape[1], dtype=np.int64)[None]  # [1, n]
        logits, new_kv = self._step(tokens, positions)
        if commit:
            self.cache.append(new_kv)
            self.n_committed += tokens.shape[1]
        return logits

    def describe(self) -> dict:
        """What this engine runs on (reported in diagnostics)."""
        return {'engine': self.name}
