"""Episodes -> chunk windows: observation at tick t, actions t..t+H-1 as tokens.

Windows start at every tick t of an episode. Near the end (t + H > T) the policy config decides: `tail='repeat'`
fills the chunk by repeating the episode's last action (a hold for absolute targets; episodes shorter than H still
train), `tail='drop'` keeps only windows that fit inside the episode. The train/validation split is by episode and
the normalization statistics come from the training episodes only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..model.action_tokenizer import ActionTokenizer, NormStats
from ..model.config import BlockVLAConfig
from ..runtime.preprocess import image_processor_for

log = logging.getLogger(__name__)


def split_episodes(episodes: Sequence, val_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle episodes with `seed` and hold out round(val_fraction * n) of them (>= 1 when asked and n >= 2)."""
    n = len(episodes)
    order = np.random.default_rng([seed, 0x5B1]).permutation(n)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    elif val_fraction > 0:
        log.warning('only %d episode: no validation split (validation loss unavailable)', n)
        n_val = 0
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [episodes[i] for i in train], [episodes[i] for i in val]


def stats_from_episodes(episodes: Sequence, use_states: bool) -> NormStats:
    """1st/99th percentile bounds from the given (training) episodes only."""
    actions = np.concatenate([ep.actions for ep in episodes])  # T_i x [D] -> [N, D]
    states = np.concatenate([ep.states for ep in episodes]) if use_states else None  # [N, S]
    return NormStats.from_data(actions, states)


def fit_images(images: np.ndarray, processor) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, h, w, 3], resized exactly as the runtime resizes (processor.resize).

    Done once when the dataset is built, so the dataset holds frames at the policy's resolution rather than
    camera-size ones; `processor.pixels` turns one into the vision input per item.
    """
    return np.stack([processor.resize(img) for img in images])


@dataclass
class _Ep:
    """One episode as the dataset keeps it (resized frames, tokenized instruction)."""

    source: str
    images: np.ndarray  # uint8 [T, h, w, 3] at the policy's resolution
    actions: np.ndarray  # float32 [T, D]
    states: Optional[np.ndarray]  # float32 [T, S] normalized, or None
    text_ids: np.ndarray  # int64 [Lt]
    text_valid: np.ndarray  # bool [Lt]


class ChunkDataset:
    """Map-style dataset of windows; items are numpy dicts (see `collate` for the batch)."""

    def __init__(self, episodes: Sequence, config: BlockVLAConfig, text_tokenizer, action_tokenizer: ActionTokenizer,
                 tail: str = 'repeat'):
        if tail not in ('repeat', 'drop'):
            raise ValueError(f"tail must be 'repeat' or 'drop', got {tail!r}")
        self.config, self.tokenizer, self.tail = config, action_tokenizer, tail
        self.images = image_processor_for(config)
        self.episodes: list[_Ep] = []
        index = []
        self.padded_windows = 0
        H = config.chunk_len
        for ep in episodes:
            source = f'{ep.bag_path} ({ep.instruction!r})'
            try:
                ids, valid = text_tokenizer.encode(ep.instruction)
            except ValueError as e:
                raise ValueError(f'{source}: {e}') from e
            if ep.actions is None or ep.actions.ndim != 2 or ep.actions.shape[1] != config.action_dim:
                shape = None if ep.actions is None else ep.actions.shape
                raise ValueError(f'{source}: actions must be [T, {config.action_dim}], got {shape}')
            states = None
            if config.state_dim:
                if ep.states is None:
                    raise ValueError(f'{source}: the policy reads a {config.state_dim}-dim state; the episode has none')
                states = np.stack([action_tokenizer.normalize_state(s) for s in ep.states])  # [T, S]
            T = len(ep.actions)
            starts = np.arange(T if tail == 'repeat' else max(T - H + 1, 0))
            self.padded_windows += int(np.sum(starts + H > T))
            e = len(self.episodes)
            index.extend((e, int(t)) for t in starts)
            self.episodes.append(_Ep(source, fit_images(np.asarray(ep.images), self.images),
                                     np.asarray(ep.actions, np.float32), states, ids, valid))
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 2)  # [N, 2] (episode, start tick)

    def __len__(self) -> int:
        return len(self.index)

    def window_actions(self, i: int) -> np.ndarray:
        """Physical actions [H, D] of window i (tail filled with the last action)."""
        e, t = self.index[i]
        acts = self.episodes[e].actions
        rows = np.minimum(np.arange(t, t + self.config.chunk_len), len(acts) - 1)
        return acts[rows]  # [H, D]

    def __getitem__(self, i: int) -> dict:
        e, t = self.index[i]
        ep = self.episodes[e]
        item = {'pixels': self.images.pixels(ep.images[t])[0],  # [1, ...] -> [...] (e.g. [3, S, S])
                'text_ids': ep.text_ids, 'text_valid': ep.text_valid,
                'actions': self.tokenizer.encode(self.window_actions(i))}  # [H*D] int64
        if ep.states is not None:
            item['state'] = ep.states[t]
        return item


def collate(items: list):
    """List of dataset items -> model.losses.Batch of torch tensors."""
    import torch

    from ..model.losses import Batch

    def stack(key):
        return torch.from_numpy(np.stack([it[key] for it in items]))  # B x [...] -> [B, ...]

    state = stack('state') if 'state' in items[0] else None
    return Batch(stack('pixels'), stack('text_ids'), stack('text_valid'), stack('actions'), state)


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """k indices spread over range(n) (all of them when k >= n)."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))
