"""Putting a run together: episodes -> split -> statistics -> policy config -> policy (+ LoRA) -> datasets."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..io.actions import generic_names
from ..model.action_tokenizer import ActionTokenizer, NormStats
from ..model.config import BlockVLAConfig
from .bag_data import LoadReport, load_episodes
from .config import TrainConfig
from .dataset import ChunkDataset, split_episodes, stats_from_episodes
from .validation import split_record

log = logging.getLogger(__name__)


@dataclass
class RunData:
    train: ChunkDataset
    val: Optional[ChunkDataset]
    stats: NormStats
    text_tokenizer: object
    summary: dict  # counts for the metrics file and TrainResult
    fingerprint: str  # identifies the episodes and split (checked on resume)
    val_split: Optional[dict] = None  # which recorded episodes are held out (validation.split_record)


def read_and_split(config: TrainConfig, episodes: Optional[Sequence] = None, progress: bool = True):
    """-> (train episodes, val episodes, policy config with action/state names, load report).

    `episodes` (io.bag_reader.Episode-like objects) bypasses the bags: the in-memory dataset interface.
    """
    model_cfg = config.model_config()
    if episodes is None:
        episodes, report = load_episodes(config.data, model_cfg, progress=progress)
    else:
        episodes = list(episodes)
        if not episodes:
            raise ValueError('no episodes given')
        report = LoadReport(episodes=len(episodes))
    train_eps, val_eps = split_episodes(episodes, config.data.val_fraction, config.train.seed)
    names = {}
    for key, width in (('action_names', model_cfg.action_dim), ('state_names', model_cfg.state_dim)):
        given = getattr(model_cfg, key)
        found = [list(getattr(ep, key, []) or []) for ep in episodes]
        real = [n for n in found if len(n) == width and n != generic_names(width)]
        names[key] = given or (real[0] if real else found[0] if len(found[0]) == width else [])
    model_cfg = model_cfg.replace(**names)
    return train_eps, val_eps, model_cfg, report


def fingerprint(train_eps: Sequence, val_eps: Sequence) -> str:
    h = hashlib.sha256()
    for split, eps in (('train', train_eps), ('val', val_eps)):
        for ep in eps:
            h.update(f'{split}|{getattr(ep, "bag_path", "")}|{ep.instruction}|{len(ep.actions)}\n'.encode())
    return h.hexdigest()[:16]


def resolve_stats(train_eps: Sequence, model_cfg: BlockVLAConfig, saved: Optional[NormStats]) -> NormStats:
    """Statistics from the training episodes; on resume the checkpoint's own (tokenization must not change)."""
    stats = stats_from_episodes(train_eps, model_cfg.state_dim > 0)
    if saved is None:
        return stats
    same = all(np.allclose(getattr(stats, k), getattr(saved, k)) for k in
               ('action_low', 'action_high', 'state_low', 'state_high'))
    if not same:
        log.warning('normalization statistics of the data differ from the checkpoint being resumed; '
                    'keeping the checkpoint statistics (did the dataset change?)')
    return saved


def build_policy(model_cfg: BlockVLAConfig, config: TrainConfig):
    """The policy (seeded init from `model.backbone` or the AR checkpoint in `model.backbone_path`), LoRA applied,
    frozen weights in train.frozen_dtype, gradient checkpointing if asked (training/memory.py)."""
    import torch

    from ..model.policy import BlockVLAPolicy
    from .memory import enable_gradient_checkpointing, store_frozen_weights

    torch.manual_seed(config.train.seed)
    policy = BlockVLAPolicy(model_cfg)
    if model_cfg.vision.get('init_from'):
        load_vision_weights(policy.vision, model_cfg.vision['init_from'])
    if config.train.lora.enabled:
        from .lora import apply_lora

        apply_lora(policy, config.train.lora)
    store_frozen_weights(policy, config.train.frozen_dtype)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    return policy


def load_vision_weights(encoder, path) -> None:
    """Vision encoder weights from a safetensors file (`vision.init_from`); names and shapes must match exactly."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'vision.init_from: no such file: {path}')
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f'vision.init_from: {path} is not a readable safetensors file ({exc})') from None
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        raise ValueError(f'vision.init_from: {path} does not match model.vision (missing {missing}, unexpected '
                         f'{extra}, shape mismatches {shapes}); was it written for this vision config?')
    encoder.load_state_dict(state)
    log.info('vision encoder initialised from %s', path)


def build_data(config: TrainConfig, policy, train_eps, val_eps, stats: NormStats, report: LoadReport) -> RunData:
    from ..model.text_tokenizer import load_text_tokenizer

    cfg = policy.config
    if cfg.is_vlm and cfg.text_tokenizer == 'auto':  # the VLM's own tokenizer fills its prompt's instruction slot
        from ..model.vlm.slot_tokenizer import slot_tokenizer

        text = slot_tokenizer(cfg.vlm_path, cfg.max_text_tokens, cfg.vlm_layout)
    else:
        text = load_text_tokenizer(cfg.text_tokenizer, cfg.max_text_tokens, policy.llm.config.vocab_size,
                                   cfg.backbone_path)
    actions = ActionTokenizer(stats, cfg.n_bins)
    train = ChunkDataset(train_eps, cfg, text, actions, config.data.tail)
    val = ChunkDataset(val_eps, cfg, text, actions, config.data.tail) if val_eps else None
    if len(train) == 0:
        raise ValueError(f'no training windows: every training episode is shorter than chunk_len {cfg.chunk_len} '
                         "and data.tail is 'drop' (use data.tail=repeat or a smaller model.chunk_len)")
    if config.train.batch_size > len(train):  # the sampler repeats windows to fill a batch: legal (a smoke run, an
        # overfit check) but rarely meant, and a huge batch costs memory whatever the data
        log.warning('train.batch_size %d is larger than the training set (%d windows from %d episodes): every batch '
                    'repeats windows; lower train.batch_size or record more episodes', config.train.batch_size,
                    len(train), len(train_eps))
    summary = {**report.to_dict(), 'episodes_train': len(train_eps), 'episodes_val': len(val_eps),
               'windows_train': len(train), 'windows_val': len(val) if val is not None else 0,
               'windows_padded': train.padded_windows + (val.padded_windows if val is not None else 0),
               'tail': config.data.tail}
    log.info('data: %d train / %d val episodes, %d / %d windows', len(train_eps), len(val_eps), len(train),
             summary['windows_val'])
    return RunData(train, val, stats, text, summary, fingerprint(train_eps, val_eps), split_record(val_eps))
