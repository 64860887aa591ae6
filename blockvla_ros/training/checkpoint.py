"""Checkpoints: a policy folder plus the training state, written as one atomic directory (no pickle anywhere).

    <out_dir>/checkpoints/step_00000500/
        config.json  model.safetensors  stats.json  [tokenizer files]   <- the policy folder the exporter reads
        train_config.yaml                                               <- the resolved training config
        training_state/
            trainable.safetensors   parameters that train (all of them, or the LoRA adapters + non-backbone parts)
            optimizer.safetensors   AdamW moments per parameter NAME ('<param>::exp_avg', ...)
            state.json              step, optimizer param groups and names, data order, seed, data summary

The whole directory is built in a temporary sibling and renamed into place, so a kill during a save leaves the
previous checkpoint untouched and loadable; leftovers of an interrupted save are removed at the next start.
The RNG state needs no saving: data order and mask sampling are reseeded from (seed, step) at every step.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from ..io.atomic import atomic_directory, atomic_write_text

log = logging.getLogger(__name__)

STATE_DIR = 'training_state'
FORMAT = 1
_STEP_RE = re.compile(r'^step_(\d+)$')


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / 'checkpoints' / f'step_{step:08d}'


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ('config.json', 'model.safetensors', 'stats.json',
                                              f'{STATE_DIR}/state.json', f'{STATE_DIR}/trainable.safetensors'))


def list_checkpoints(out_dir: str | Path) -> list:
    """[(step, path)] of the complete checkpoints under out_dir, oldest first."""
    root = Path(out_dir) / 'checkpoints'
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def remove_partial_saves(out_dir: str | Path) -> None:
    """Delete temporary directories left by a save that was killed (they never replaced a checkpoint)."""
    root = Path(out_dir) / 'checkpoints'
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith('.step_') and child.is_dir():
                log.warning('removing %s: left by an interrupted checkpoint save', child)
                shutil.rmtree(child, ignore_errors=True)


def prune(out_dir: str | Path, keep: int) -> None:
    """Keep only the newest `keep` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for _step, path in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# --- optimizer state <-> flat tensors ----------------------------------------------------------------------------
def flatten_optimizer(state_dict: dict, names: list) -> tuple[dict, list]:
    """torch optimizer state_dict (params by index) -> ({'<name>::<key>': tensor}, param_groups without params)."""
    tensors = {}
    for index, per_param in state_dict['state'].items():
        for key, value in per_param.items():
            tensors[f'{names[index]}::{key}'] = value.detach().contiguous().cpu()
    groups = []
    for group in state_dict['param_groups']:
        g = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != 'params'}
        g['param_names'] = [names[i] for i in group['params']]
        groups.append(g)
    return tensors, groups


def unflatten_optimizer(tensors: dict, groups: list, names: list) -> dict:
    """The inverse, against the current optimizer's parameter names (which must be the same set)."""
    saved = [n for g in groups for n in g['param_names']]
    if saved != list(names):
        missing, extra = sorted(set(names) - set(saved))[:5], sorted(set(saved) - set(names))[:5]
        raise ValueError('the checkpoint optimizer state belongs to other parameters (missing '
                         f'{missing}, unexpected {extra}): was the model or LoRA config changed?')
    index = {n: i for i, n in enumerate(names)}
    state: dict = {}
    for key, value in tensors.items():
        name, sub = key.rsplit('::', 1)
        state.setdefault(index[name], {})[sub] = value
    param_groups = []
    for g in groups:
        g = dict(g)
        g['params'] = [index[n] for n in g.pop('param_names')]
        if 'betas' in g:
            g['betas'] = tuple(g['betas'])
        param_groups.append(g)
    return {'state': state, 'param_groups': param_groups}


# --- save / load -------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, *, policy_config, policy_state: dict, stats, train_config, trainable: dict,
                    optimizer_tensors: dict, state: dict, extra_files: Optional[Callable[[Path], None]] = None) -> Path:
    """Write one checkpoint directory atomically (see the module docstring for the layout)."""
    from safetensors.torch import save_file

    try:
        _write_checkpoint(path, policy_config, policy_state, stats, train_config, trainable, optimizer_tensors, state,
                          extra_files, save_file)
    except Exception as e:  # a full disk, a read-only folder: OSError, or safetensors' own error type
        if not isinstance(e, OSError) and type(e).__name__ != 'SafetensorError':
            raise
        kept = latest_checkpoint(path.parent.parent)
        raise CheckpointWriteError(f'cannot write the checkpoint {path} ({e}); nothing was replaced: '
                                   f'{"the newest checkpoint is " + str(kept) if kept else "no checkpoint was saved"}'
                                   ) from None
    return path


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission); the ones before it are untouched."""


def _write_checkpoint(path, policy_config, policy_state, stats, train_config, trainable, optimizer_tensors, state,
                      extra_files, save_file) -> None:
    with atomic_directory(path) as tmp:
        policy_config.save(tmp / 'config.json')
        save_file({k: v.detach().contiguous().cpu() for k, v in policy_state.items()}, str(tmp / 'model.safetensors'))
        stats.save(tmp / 'stats.json')
        if extra_files is not None:
            extra_files(tmp)
        train_config.save(tmp / 'train_config.yaml')
        sdir = tmp / STATE_DIR
        sdir.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(sdir / 'trainable.safetensors'))
        save_file(optimizer_tensors, str(sdir / 'optimizer.safetensors'))
        atomic_write_text(sdir / 'state.json', json.dumps({'format': FORMAT, **state}, indent=2))


def load_training_state(path: str | Path) -> tuple[dict, dict, dict]:
    """-> (trainable tensors, optimizer tensors, state dict) of a checkpoint; a clear error if it is incomplete."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f'checkpoint to resume from does not exist: {path}')
    if not is_complete(path):
        raise ValueError(f'{path} is not a complete training checkpoint (needs config.json, model.safetensors, '
                         f'stats.json and {STATE_DIR}/state.json + trainable.safetensors)')
    sdir = path / STATE_DIR
    try:
        state = json.loads((sdir / 'state.json').read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{sdir / "state.json"}: not valid JSON ({e})') from e
    if state.get('format') != FORMAT:
        raise ValueError(f'{sdir / "state.json"}: unknown checkpoint format {state.get("format")!r}')
    opt_file = sdir / 'optimizer.safetensors'
    optimizer = _load_tensors(load_file, opt_file) if opt_file.is_file() else {}
    return _load_tensors(load_file, sdir / 'trainable.safetensors'), optimizer, state


def _load_tensors(load_file, path: Path) -> dict:
    """A damaged file (copied in part, a failing disk) is a ValueError naming it, not safetensors' own error."""
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError: safetensors has no common base class to catch
        raise ValueError(f'{path}: not a readable safetensors file ({e}); the checkpoint is damaged: resume from '
                         f'another one (--resume <checkpoint>) or start over (--resume never)') from None
