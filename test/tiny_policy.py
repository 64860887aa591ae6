"""A tiny random checkpoint on disk and its exported policy folder, shared by the export/runtime tests."""
from pathlib import Path

import numpy as np

from blockvla_ros.model.action_tokenizer import NormStats
from blockvla_ros.model.policy import BlockVLAPolicy

from tiny import tiny_config


def write_checkpoint(folder: Path, **overrides) -> Path:
    """config.json + model.safetensors + stats.json, as training writes them."""
    config = tiny_config(**overrides)
    policy = BlockVLAPolicy(config)
    policy.save(folder)
    rng = np.random.default_rng(0)
    states = rng.normal(size=(200, config.state_dim)) if config.state_dim else None
    NormStats.from_data(rng.normal(size=(200, config.action_dim)) * [1.0, 0.5, 2.0][:config.action_dim],
                        states).save(folder / 'stats.json')
    return folder


def export_tiny(root: Path, name: str = 'tiny', parity_samples: int = 2, torch_weights: bool = False,
                **overrides) -> Path:
    """Checkpoint under root/ckpt_<name>, policy folder root/models/<name> (one thread: the CI has 2 cores);
    `torch_weights` adds model.safetensors (engine 'torch')."""
    from blockvla_ros.export.policy_writer import export_policy

    ckpt = write_checkpoint(root / f'ckpt_{name}', **overrides)
    out = root / 'models' / name
    export_policy(ckpt, out, parity_samples=parity_samples, threads=1, progress=False, torch_weights=torch_weights)
    return out
