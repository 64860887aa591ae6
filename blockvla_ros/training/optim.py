"""AdamW with decay only on matrices, and a warmup + cosine learning rate that is a pure function of the step."""
from __future__ import annotations

import math

from .config import TrainOptions


def param_groups(module, weight_decay: float) -> tuple[list, list]:
    """-> (torch param groups, parameter names in optimizer order). Frozen parameters (LoRA base) are left out."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2:
            decay.append(p)
            decay_names.append(name)
        else:  # biases, norm weights, scalars
            no_decay.append(p)
            no_decay_names.append(name)
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    return groups, decay_names + no_decay_names


def build_optimizer(module, opts: TrainOptions):
    """-> (AdamW, names) where names[i] is the parameter at optimizer index i (used to save its state by name)."""
    import torch

    groups, names = param_groups(module, opts.weight_decay)
    if not names:
        raise ValueError('no trainable parameters')
    fused = all(p.is_cuda for g in groups for p in g['params'])
    optimizer = torch.optim.AdamW(groups, lr=opts.lr, betas=tuple(opts.betas), **({'fused': True} if fused else {}))
    return optimizer, names


def lr_at(step: int, opts: TrainOptions) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio * lr."""
    if opts.warmup_steps and step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    span = max(opts.steps - opts.warmup_steps, 1)
    progress = min(max(step - opts.warmup_steps, 0) / span, 1.0)
    floor = opts.min_lr_ratio
    return opts.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group['lr'] = lr
