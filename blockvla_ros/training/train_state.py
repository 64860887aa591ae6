"""Moving training state between the accelerate-prepared objects and checkpoint files (checkpoint.py's layout).

Plain / DDP runs read the unwrapped state dicts. FSDP runs gather full (unsharded) state dicts with torch's
distributed-checkpoint API (collective: every process calls it), keyed by parameter name, and load them back the
same way. Exercised by a 2-process CPU (gloo) FSDP2 run in test_training_distributed.py (save and resume).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..io.atomic import atomic_write_text
from .validation import SPLIT_FILE

log = logging.getLogger(__name__)

PREFIX = 'policy.'  # the LossModule holds the policy under this name


class Saver:
    """Gathers weights + optimizer state and writes one checkpoint on the main process (checkpoint.save_checkpoint)."""

    def __init__(self, accelerator, module, optimizer, names, policy, data, config, out_dir: Path, fsdp: bool):
        self.acc, self.module, self.optimizer, self.names = accelerator, module, optimizer, names
        self.policy, self.data, self.config, self.out_dir, self.fsdp = policy, data, config, out_dir, fsdp
        self.trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
        self.last_step = None

    def save(self, step: int) -> None:
        from .checkpoint import checkpoint_path, flatten_optimizer, prune, save_checkpoint

        self.last_step = step
        path = checkpoint_path(self.out_dir, step)
        full = self.acc.get_state_dict(self.module)  # {'policy.<name>': tensor}; gathered under FSDP
        state = {k[len(PREFIX):]: v for k, v in full.items() if k.startswith(PREFIX)}
        if self.fsdp:
            osd = fsdp_optimizer_state(self.module, self.optimizer, self.names)
        else:
            osd = self.optimizer.state_dict()
        if self.acc.is_main_process and not path.exists():
            opt_tensors, groups = flatten_optimizer(osd, self.names)
            lora = self.config.train.lora
            if lora.enabled:
                from .lora import merge_lora_state

                policy_state = merge_lora_state(state, lora)
            else:
                policy_state = state
            trainable = {k: v for k, v in state.items() if k in self.trainable}
            opts = self.config.train
            meta = {'step': step, 'seed': opts.seed, 'mode': opts.mode, 'global_batch': opts.batch_size,
                    'world_size': self.acc.num_processes, 'distributed': self.acc.distributed_type.name,
                    'samples_seen': step * opts.batch_size,
                    'optimizer_groups': groups, 'data_fingerprint': self.data.fingerprint, 'data': self.data.summary,
                    'rng': 'reseeded from (seed, step, micro-batch) every step: nothing to restore'}
            save_checkpoint(path, policy_config=self.policy.portable_config(), policy_state=policy_state,
                            stats=self.data.stats, train_config=self.config, trainable=trainable,
                            optimizer_tensors=opt_tensors, state=meta, extra_files=self._tokenizer_files)
            prune(self.out_dir, opts.keep_checkpoints)
            log.info('checkpoint %s', path)
        self.acc.wait_for_everyone()

    def _tokenizer_files(self, folder: Path) -> None:
        """The checkpoint's extra files: the text tokenizer's, and the validation split's record."""
        if self.data.val_split is not None:
            atomic_write_text(folder / SPLIT_FILE, json.dumps(self.data.val_split, indent=1))
        text = self.data.text_tokenizer
        if hasattr(text, 'save_files'):  # a VLM's slot tokenizer: its tokenizer.json
            text.save_files(folder)
            return
        tok = getattr(text, 'tok', None)
        if tok is not None:  # text_tokenizer: auto -> the policy folder carries the tokenizer
            tok.save_pretrained(str(folder))


def load_trainable(policy, trainable: dict, path: Path) -> None:
    """Put a checkpoint's trainable tensors into a freshly built policy (before accelerate wraps it)."""
    expected = {n for n, p in policy.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - set(trainable)), sorted(set(trainable) - expected)
    if missing or unexpected:
        raise ValueError(f'{path}: trainable weights do not match this model (missing {missing[:5]}, unexpected '
                         f'{unexpected[:5]}); was the model or LoRA config changed?')
    policy.load_state_dict(trainable, strict=False)


def load_optimizer(module, optimizer, opt_tensors: dict, groups: list, names: list, fsdp: bool) -> None:
    """Restore AdamW moments saved by name (after accelerator.prepare, so they land on the right device)."""
    from .checkpoint import unflatten_optimizer

    osd = unflatten_optimizer(opt_tensors, groups, names)
    if not fsdp:
        optimizer.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    named = {'state': {PREFIX + names[i]: v for i, v in osd['state'].items()},
             'param_groups': [{**{k: v for k, v in g.items() if k != 'params'},
                               'params': [PREFIX + names[i] for i in g['params']]} for g in osd['param_groups']]}
    set_optimizer_state_dict(module, optimizer.optimizer, optim_state_dict=named,
                             options=StateDictOptions(full_state_dict=True))


def fsdp_optimizer_state(module, optimizer, names: list) -> dict:
    """Full optimizer state gathered from the shards (collective), in the index-keyed layout of
    optimizer.state_dict()."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(module, optimizer.optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    index = {PREFIX + n: i for i, n in enumerate(names)}
    state = {index[k]: v for k, v in osd.get('state', {}).items()}
    groups = [{**{k: v for k, v in g.items() if k != 'params'}, 'params': [index[p] for p in g['params']]}
              for g in osd.get('param_groups', [])]
    return {'state': state, 'param_groups': groups}
