"""Attention masks (bool, True = may attend) for training and for the uncached reference forward.

Every token carries three attributes: its kind (PREFIX, NOISY action copy, CLEAN action copy), its block id
(counted from the start of the action region) and whether it is valid (prefix padding is not). One vectorized rule
set covers all three training modes:

    blockdiff (teacher forcing), P=3 prefix, L=4 actions, B=2 -> noisy blocks n0 n1, clean blocks c0 c1

                  keys:  p p p | n0 n0 n1 n1 | c0 c0 c1 c1
        p               x . .    .  .  .  .    .  .  .  .      prefix: causal over valid prefix,
        p               x x .    .  .  .  .    .  .  .  .      never sees actions
        p               x x x    .  .  .  .    .  .  .  .
        n0              x x x    x  x  .  .    .  .  .  .      noisy block b: itself (bidirectional)
        n0              x x x    x  x  .  .    .  .  .  .      + clean blocks < b
        n1              x x x    .  .  x  x    x  x  .  .
        n1              x x x    .  .  x  x    x  x  .  .
        c0              x x x    .  .  .  .    x  x  .  .      clean block b: clean blocks <= b
        c0              x x x    .  .  .  .    x  x  .  .
        c1              x x x    .  .  .  .    x  x  x  x
        c1              x x x    .  .  .  .    x  x  x  x

    ar:       prefix + a CLEAN copy with block size 1 (plain causal attention).
    fulldiff: prefix + a NOISY copy that is one block (bidirectional over all actions).

Padding keys are never attended; a padding query attends to itself only (so no softmax row is empty).
"""
from __future__ import annotations

import numpy as np
import torch

PREFIX, NOISY, CLEAN = 0, 1, 2


def build_mask(kind: torch.Tensor, block: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """kind, block: [T] int; valid: [..., T] bool -> mask [..., T, T] bool (query, key)."""
    q_kind, k_kind = kind[:, None], kind[None, :]  # [T, 1], [1, T]
    q_blk, k_blk = block[:, None], block[None, :]
    idx = torch.arange(kind.shape[0], device=kind.device)
    causal = idx[None, :] <= idx[:, None]
    prefix_q = (q_kind == PREFIX) & (k_kind == PREFIX) & causal
    action_q_prefix_k = (q_kind != PREFIX) & (k_kind == PREFIX)
    clean_q = (q_kind == CLEAN) & (k_kind == CLEAN) & (k_blk <= q_blk)
    noisy_q_clean_k = (q_kind == NOISY) & (k_kind == CLEAN) & (k_blk < q_blk)
    noisy_q_noisy_k = (q_kind == NOISY) & (k_kind == NOISY) & (k_blk == q_blk)
    rule = prefix_q | action_q_prefix_k | clean_q | noisy_q_clean_k | noisy_q_noisy_k  # [T, T]
    eye = torch.eye(kind.shape[0], dtype=torch.bool, device=kind.device)
    return (rule & valid[..., None, :]) | eye  # [..., T, T]


def layout(prefix_len: int, n_actions: int, block_size: int, mode: str, device=None):
    """Token attributes (kind [T], block [T]) of the training sequence for `mode`."""
    a = torch.arange(n_actions, device=device)
    pk = torch.full((prefix_len,), PREFIX, device=device)
    pb = torch.zeros(prefix_len, dtype=torch.long, device=device)
    if mode == 'blockdiff':
        kind = torch.cat([pk, torch.full((n_actions,), NOISY, device=device),
                          torch.full((n_actions,), CLEAN, device=device)])
        block = torch.cat([pb, a // block_size, a // block_size])
    elif mode == 'ar':
        kind = torch.cat([pk, torch.full((n_actions,), CLEAN, device=device)])
        block = torch.cat([pb, a])
    elif mode == 'fulldiff':
        kind = torch.cat([pk, torch.full((n_actions,), NOISY, device=device)])
        block = torch.cat([pb, torch.zeros(n_actions, dtype=torch.long, device=device)])
    else:
        raise ValueError(f'unknown mask mode {mode!r}')
    return kind.long(), block.long()


def training_mask(prefix_valid: torch.Tensor, n_actions: int, block_size: int, mode: str,
                  prefix_layout=None) -> torch.Tensor:
    """prefix_valid [N, P] bool -> mask [N, 1, T, T] for the training sequence of `mode`.

    `prefix_layout` (a VLM's prompt layout, model.vlm.layout) replaces the prefix block's causal rule with its own
    (PaliGemma's prefix-LM); the action rows and columns are the same."""
    n, p = prefix_valid.shape
    kind, block = layout(p, n_actions, block_size, mode, prefix_valid.device)
    valid = torch.cat([prefix_valid, prefix_valid.new_ones(n, kind.shape[0] - p)], dim=1)  # [N, T]
    mask = build_mask(kind, block, valid)[:, None]  # [N, T, T] -> [N, 1, T, T]
    return _with_prefix_rule(mask, prefix_valid, prefix_layout)


def _with_prefix_rule(mask: torch.Tensor, prefix_valid: torch.Tensor, prefix_layout) -> torch.Tensor:
    """Tensor ops on the layout's constant rule (so a traced graph keeps its dependence on the validity)."""
    if prefix_layout is None:
        return mask
    p = prefix_valid.shape[1]
    rule = torch.from_numpy(prefix_layout.rule()).to(mask.device)  # [P, P]
    eye = torch.eye(p, dtype=torch.bool, device=mask.device)
    prefix = (rule & prefix_valid[:, None, :]) | eye  # [N, P, P]
    return torch.cat([torch.cat([prefix[:, None], mask[:, :, :p, p:]], -1), mask[:, :, p:]], 2)


def decoding_reference_mask(prefix_valid: torch.Tensor, n_committed: int, n_current: int,
                            block_size: int, prefix_layout=None) -> torch.Tensor:
    """Mask of one uncached forward over [prefix][committed clean blocks][current noisy block].

    This is what block-diffusion decoding with a KV cache computes implicitly: the committed blocks are the clean
    copy (block-causal) and the block being refined sees the prefix, every committed block and itself.
    prefix_valid [N, P] -> [N, 1, T, T] with T = P + n_committed + n_current.
    """
    n, p = prefix_valid.shape
    dev = prefix_valid.device
    committed = torch.arange(n_committed, device=dev) // block_size
    current_block = n_committed // block_size
    kind = torch.cat([torch.full((p,), PREFIX, device=dev), torch.full((n_committed,), CLEAN, device=dev),
                      torch.full((n_current,), NOISY, device=dev)]).long()
    block = torch.cat([torch.zeros(p, dtype=torch.long, device=dev), committed,
                       torch.full((n_current,), current_block, dtype=torch.long, device=dev)])
    valid = torch.cat([prefix_valid, prefix_valid.new_ones(n, n_committed + n_current)], dim=1)
    return _with_prefix_rule(build_mask(kind, block, valid)[:, None], prefix_valid, prefix_layout)


def position_ids(prefix_valid: torch.Tensor, n_actions: int, copies: int, prefix_layout=None) -> torch.Tensor:
    """Positions: valid prefix tokens 0..n-1 (padding gets 0), every action copy continues at n.

    prefix_valid [N, P] -> [N, P + copies * n_actions]; both action copies carry the same positions. With a VLM's
    `prefix_layout`: its positions (PaliGemma from 1; Qwen2-VL's 3-D M-RoPE, [3, N, ...]), actions continuing.
    """
    if prefix_layout is not None:  # tensor ops on the layout's constants (traceable)
        base, slot, empty_next = (torch.from_numpy(np.asarray(x)).to(prefix_valid.device)
                                  for x in prefix_layout.position_table())
        in_slot = (prefix_valid & slot).long()  # [N, P]: valid instruction tokens
        before = in_slot.cumsum(1) - in_slot  # valid instruction tokens before each token
        pre = (base[:, None, :] + before[None]) * prefix_valid.long()[None]  # [R, N, P]
        first = empty_next + in_slot.sum(1, keepdim=True) + torch.arange(n_actions, device=prefix_valid.device)
        pos = torch.cat([pre] + [first[None].expand(pre.shape[0], -1, -1)] * copies, dim=-1)  # [R, N, T]
        return pos if prefix_layout.rope_dims == 3 else pos[0]
    pv = prefix_valid.long()
    prefix_pos = (pv.cumsum(1) - 1).clamp(min=0) * pv  # [N, P]
    n_valid = pv.sum(1, keepdim=True)  # [N, 1]
    act = n_valid + torch.arange(n_actions, device=pv.device)[None]  # [N, L]
    return torch.cat([prefix_pos] + [act] * copies, dim=1)
