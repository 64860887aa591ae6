"""ActionTokenizer: per-dimension uniform bins between the 1st and 99th percentile of the training actions.

Pure numpy (the ONNX/TensorRT runtime uses it without torch). Statistics live in stats.json next to the weights;
users never normalize by hand.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..io.atomic import atomic_write_text


class MissingStatsError(FileNotFoundError, ValueError):
    """stats.json is missing: a policy cannot tokenize or denormalize actions without it."""


@dataclass
class NormStats:
    """Quantile bounds per action dimension (and per state dimension, if the policy reads proprioception)."""

    action_low: list  # 1st percentile per dim
    action_high: list  # 99th percentile per dim
    state_low: list = field(default_factory=list)
    state_high: list = field(default_factory=list)
    n_samples: int = 0

    def __post_init__(self):
        for name in ('action_low', 'action_high', 'state_low', 'state_high'):
            values = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            if not np.all(np.isfinite(values)):
                raise ValueError(f'NormStats.{name} contains NaN or inf: {values.tolist()}')
            setattr(self, name, values.tolist())
        if len(self.action_low) != len(self.action_high) or not self.action_low:
            raise ValueError(f'NormStats: action_low/action_high must be non-empty and of equal length, got '
                             f'{len(self.action_low)} and {len(self.action_high)}')
        if len(self.state_low) != len(self.state_high):
            raise ValueError('NormStats: state_low/state_high lengths differ')
        if np.any(np.asarray(self.action_high) < np.asarray(self.action_low)):
            raise ValueError('NormStats: action_high < action_low in some dimension')

    @classmethod
    def from_data(cls, actions: np.ndarray, states: Optional[np.ndarray] = None,
                  q_low: float = 1.0, q_high: float = 99.0) -> 'NormStats':
        """Compute the bounds from actions [N, D] (and states [N, S]); rows with NaN/inf are an error."""
        actions = _check_2d('actions', actions)
        kwargs = {}
        if states is not None and np.asarray(states).size:
            states = _check_2d('states', states)
            kwargs = dict(state_low=np.percentile(states, q_low, axis=0),
                          state_high=np.percentile(states, q_high, axis=0))
        return cls(action_low=np.percentile(actions, q_low, axis=0), action_high=np.percentile(actions, q_high, axis=0),
                   n_samples=int(actions.shape[0]), **kwargs)

    def to_dict(self) -> dict:
        return dict(action_low=self.action_low, action_high=self.action_high, state_low=self.state_low,
                    state_high=self.state_high, n_samples=self.n_samples)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> 'NormStats':
        path = Path(path)
        if not path.is_file():
            raise MissingStatsError(f'normalization statistics missing: {path} (stats.json is written by '
                                    'training next to the weights)')
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f'{path}: not valid JSON ({e})') from e
        return cls(**data)


def _check_2d(name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f'{name} must be a non-empty [N, D] array, got shape {x.shape}')
    if not np.all(np.isfinite(x)):
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f'{name} contains NaN or inf in {bad} of {x.shape[0]} rows')
    return x


def _normalize(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map [low, high] -> [-1, 1], clipped; constant dims (high == low) map to 0."""
    span = high - low
    safe = np.where(span > 0, span, 1.0)
    out = 2.0 * (x - low) / safe - 1.0
    return np.clip(np.where(span > 0, out, 0.0), -1.0, 1.0)


def _denormalize(z: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return (z + 1.0) * 0.5 * (high - low) + low


class ActionTokenizer:
    """Actions [H, D] (physical units) <-> tokens [H*D] in 0..n_bins-1, timestep-major (t0 d0..dD-1, t1 ...)."""

    def __init__(self, stats: NormStats, n_bins: int = 256):
        if stats is None:
            raise MissingStatsError('ActionTokenizer needs normalization statistics (stats.json); none were given')
        self.stats = stats
        self.n_bins = int(n_bins)
        self.low = np.asarray(stats.action_low, dtype=np.float64)
        self.high = np.asarray(stats.action_high, dtype=np.float64)
        self.action_dim = len(self.low)
        # bin k covers [-1 + k w, -1 + (k+1) w) in normalized space; decode returns its centre
        self.width = 2.0 / self.n_bins
        self.centers = -1.0 + self.width * (np.arange(self.n_bins) + 0.5)

    def _check_actions(self, actions) -> np.ndarray:
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[1] != self.action_dim:
            raise ValueError(f'actions must have shape [H, {self.action_dim}] (action_dim from stats.json), '
                             f'got {tuple(np.shape(actions))}')
        if not np.all(np.isfinite(a)):
            raise ValueError(f'actions contain NaN or inf at timesteps {np.where(~np.isfinite(a).all(1))[0].tolist()}')
        return a

    def normalize(self, actions) -> np.ndarray:
        return _normalize(self._check_actions(actions), self.low, self.high)

    def encode(self, actions) -> np.ndarray:
        """Actions [H, D] -> int64 tokens [H*D]."""
        z = self.normalize(actions)
        tokens = np.floor((z + 1.0) / self.width).astype(np.int64)
        return np.clip(tokens, 0, self.n_bins - 1).reshape(-1)  # [H, D] -> [H*D], timestep-major

    def decode(self, tokens) -> np.ndarray:
        """int tokens [H*D] (or [H, D]) -> float32 actions [H, D] at the bin centres."""
        t = np.asarray(tokens)
        if t.size % self.action_dim:
            raise ValueError(f'{t.size} tokens do not split into timesteps of {self.action_dim} dims')
        if t.size and (t.min() < 0 or t.max() >= self.n_bins):
            raise ValueError(f'action tokens must be in [0, {self.n_bins - 1}], got range [{t.min()}, {t.max()}]')
        z = self.centers[t.reshape(-1, self.action_dim)]  # [H*D] -> [H, D]
        return _denormalize(z, self.low, self.high).astype(np.float32)

    def normalize_state(self, state) -> np.ndarray:
        s = np.asarray(state, dtype=np.float64).reshape(-1)
        low = np.asarray(self.stats.state_low)
        if s.shape[0] != low.shape[0]:
            raise ValueError(f'state has {s.shape[0]} values but stats.json describes {low.shape[0]}')
        if not np.all(np.isfinite(s)):
            raise ValueError('state contains NaN or inf')
        return _normalize(s, low, np.asarray(self.stats.state_high)).astype(np.float32)
