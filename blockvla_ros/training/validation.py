"""Validation: the training loss on held-out episodes (fixed masks, so passes are comparable over time), and a
mode-independent check that decodes held-out windows with the policy's decoder and measures the action error.

The loss runs in fixed batches, batch j with masks seeded by (seed, j) and batches dealt round-robin to the
processes, so the value does not depend on how many processes share the work.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from .dataset import ChunkDataset, collate
from .sampler import mix_seed

log = logging.getLogger(__name__)

VAL_SEED_SALT = 0x7A1
# In every checkpoint: the held-out episodes by recording (bag path as the run read it, first tick stamp, ticks), so
# export's calibration reads only their bags instead of every bag of the run to rebuild the split.
SPLIT_FILE = 'val_split.json'


def split_record(val_episodes) -> Optional[dict]:
    """-> the SPLIT_FILE content of a validation split; None when an episode has no recording (in-memory data)."""
    if not all(getattr(ep, 'bag_path', '') for ep in val_episodes):
        return None
    return {'format': 1, 'episodes': [{'bag': str(ep.bag_path), 'start_ns': int(ep.stamps_ns[0]), 'ticks': len(ep)}
                                      for ep in val_episodes]}


def _recorded_split(tc, path: Path, progress: bool) -> Optional[list]:
    """The validation episodes a checkpoint's SPLIT_FILE names, reading only their bags; None (with a warning) when
    the record is unreadable or an episode is not found as recorded (the caller then rebuilds the split)."""
    from ..io.bag_reader import BagError
    from .bag_data import load_episodes

    try:
        doc = json.loads(path.read_text())
        wanted = [(str(e['bag']), int(e['start_ns']), int(e['ticks'])) for e in doc['episodes']]
        bags = list(dict.fromkeys(bag for bag, _, _ in wanted))
        episodes, _ = load_episodes(tc.replace({'data.bags': bags}).data, tc.model_config(), progress=progress)
    except (OSError, ValueError, KeyError, TypeError, BagError) as e:
        log.warning('%s: cannot use the recorded validation split (%s: %s); reading every bag', path,
                    type(e).__name__, e)
        return None
    found = {(str(ep.bag_path), int(ep.stamps_ns[0]), len(ep)): ep for ep in episodes}
    missing = [w for w in wanted if w not in found]
    if missing or not wanted:
        log.warning('%s: %d of %d recorded validation episodes are not in their bags as recorded (e.g. %s); '
                    'reading every bag', path, len(missing), len(wanted), missing[:1])
        return None
    return [found[w] for w in wanted]


def validation_loss(module, dataset: ChunkDataset, indices: np.ndarray, batch_size: int, seed: int, device,
                    rank: int = 0, world: int = 1, reduce=None, autocast=None) -> dict:
    """-> {'val_loss', 'val_masked_acc'} over `indices` (weighted by batch size). `module` is a LossModule."""
    import contextlib

    import torch

    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, acc sum, samples
    was_training = module.training
    module.eval()
    with torch.no_grad(), (autocast() if autocast is not None else contextlib.nullcontext()):
        for j in range(rank, len(batches), world):
            batch = collate([dataset[int(i)] for i in batches[j]]).to(device)
            loss, info = module(batch, seed=mix_seed(seed, VAL_SEED_SALT, j))
            n = len(batches[j])
            totals += torch.tensor([float(loss) * n, info['masked_acc'] * n, n], dtype=torch.float64, device=device)
    module.train(was_training)
    if reduce is not None:
        totals = reduce(totals)
    loss_sum, acc_sum, count = totals.tolist()
    if count == 0:
        return {}
    return {'val_loss': loss_sum / count, 'val_masked_acc': acc_sum / count}


def decode_error(policy, dataset: ChunkDataset, indices: np.ndarray, device) -> dict:
    """Decode windows with the policy's default decoder (batch 1, torch engine) and compare with the truth.

    val_action_err: mean |decoded - true| in normalized action units ([-1, 1] spans the 1st-99th percentile);
    val_token_acc: share of exactly right action tokens; val_nfe: mean forward passes per chunk.
    """
    from ..runtime.decoding import Decoder
    from ..runtime.engine import PrefixInputs
    from ..runtime.torch_engine import TorchEngine

    cfg = policy.config
    was_training = policy.training
    engine = TorchEngine(policy, device=str(device))
    decoder = Decoder(cfg)
    errs, accs, nfes = [], [], []
    for i in indices:
        item = dataset[int(i)]
        state = item['state'][None] if 'state' in item else None  # [S] -> [1, S]
        prefix = PrefixInputs(item['pixels'][None], item['text_ids'][None], item['text_valid'][None], state)
        res = decoder(engine, prefix)
        truth = item['actions']
        width = 2.0 / cfg.n_bins  # one bin in normalized units
        errs.append(float(np.abs(res.tokens - truth).mean() * width))
        accs.append(float((res.tokens == truth).mean()))
        nfes.append(res.nfe)
    policy.train(was_training)
    if not errs:
        return {}
    return {'val_action_err': float(np.mean(errs)), 'val_token_acc': float(np.mean(accs)),
            'val_nfe': float(np.mean(nfes)), 'decoder': decoder.decoder}


def held_out_windows(train_config, config, text_tokenizer, action_tokenizer, bags=None, max_windows: int = 128,
                     progress: bool = False) -> tuple[list, str]:
    """Observation windows nobody trained on, for decoding calibration at export -> ([PrefixInputs], source).

    train_config: the run's resolved training config (a checkpoint's train_config.yaml, or a TrainConfig). Without
    `bags`: its validation split (the same bags, the same seeded episode split as training; from a checkpoint, only
    the bags its SPLIT_FILE names are read). With `bags`: every episode of those bags, read with the run's topics
    and rate. `max_windows` evenly spaced windows are kept.
    """
    from ..runtime.engine import PrefixInputs
    from .assemble import read_and_split
    from .bag_data import load_episodes
    from .config import TrainConfig, load_train_config
    from .dataset import ChunkDataset, evenly_spaced

    tc = train_config if isinstance(train_config, TrainConfig) else load_train_config(train_config)
    record = None if isinstance(train_config, TrainConfig) else Path(train_config).parent / SPLIT_FILE
    episodes = None
    if bags:
        tc = tc.replace({'data.bags': [str(b) for b in bags]})
        episodes, _ = load_episodes(tc.data, tc.model_config(), progress=progress)
        source = f'{len(episodes)} episodes of {", ".join(str(b) for b in bags)}'
    elif record is not None and record.is_file() and (episodes := _recorded_split(tc, record, progress)):
        source = (f'validation split of {", ".join(str(b) for b in tc.data.bags)} ({len(episodes)} episodes, '
                  f'as recorded in {SPLIT_FILE})')
    else:
        missing = [str(b) for b in tc.data.bags if not Path(b).expanduser().exists()]
        if missing:
            raise ValueError(f'the run\'s bags {missing} (data.bags of {train_config}) are not found from '
                             f'{Path.cwd()} (a relative path is relative to where training ran): give the held-out '
                             'bags (blockvla-export --calibration-bags) or keep the training decoding (--no-calibrate)')
        _train, episodes, _cfg, _report = read_and_split(tc, progress=progress)
        if not episodes:
            raise ValueError(f'the run has no validation split (data.val_fraction {tc.data.val_fraction}); '
                             'give held-out bags instead')
        source = (f'validation split of {", ".join(str(b) for b in tc.data.bags)} ({len(episodes)} episodes, '
                  f'val_fraction {tc.data.val_fraction}, seed {tc.train.seed})')
    dataset = ChunkDataset(episodes, config, text_tokenizer, action_tokenizer, tc.data.tail)
    windows = []
    for i in evenly_spaced(len(dataset), max_windows):
        item = dataset[int(i)]
        state = item['state'][None] if 'state' in item else None  # [S] -> [1, S]
        windows.append(PrefixInputs(item['pixels'][None], item['text_ids'][None], item['text_valid'][None], state))
    return windows, f'{len(windows)} windows from the {source}'
