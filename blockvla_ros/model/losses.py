"""Training losses for the three decoders, on the same policy: block diffusion, AR, full-sequence diffusion.

Which logit predicts action token i (`logit_shift`):
  'same': the output at token i's own position;
  'next': the output one position earlier (the AR convention, so an AR checkpoint's head is reused). For the first
          token of block b that earlier position is the *clean* copy's last token of block b-1 (the last prefix
          token for b = 0): exactly the commit pass that provides it at inference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .masks import position_ids, training_mask
from .policy import BlockVLAPolicy


@dataclass
class Batch:
    pixels: torch.Tensor  # [N, 3, S, S] float, normalized
    text_ids: torch.Tensor  # [N, Lt] int64, left-padded
    text_valid: torch.Tensor  # [N, Lt] bool
    actions: torch.Tensor  # [N, L] int64 action tokens (L = H*D)
    state: Optional[torch.Tensor] = None  # [N, S] float, normalized

    def to(self, device) -> 'Batch':
        return Batch(*(None if t is None else t.to(device) for t in
                       (self.pixels, self.text_ids, self.text_valid, self.actions, self.state)))


def sample_block_mask(n: int, n_tokens: int, block_size: int, eps: float, generator=None,
                      device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask ratio per block: t ~ U(0,1), p = (1-eps) t + eps; at least one masked token per block.

    Returns (masked [N, L] bool, t per token [N, L]). block_size = L gives one ratio per sequence (full diffusion).
    """
    nb = n_tokens // block_size
    t = torch.rand(n, nb, 1, generator=generator, device=device)  # [N, nb, 1]
    p = (1 - eps) * t + eps
    u = torch.rand(n, nb, block_size, generator=generator, device=device)
    masked = u < p  # [N, nb, B]
    # force the token with the smallest u in each block (already the most likely to be masked)
    forced = F.one_hot(u.argmin(-1), block_size).bool()
    masked = masked | forced
    return masked.reshape(n, n_tokens), t.expand(n, nb, block_size).reshape(n, n_tokens)  # [N, nb, B] -> [N, L]


def _shifted(out_noisy: torch.Tensor, boundary: torch.Tensor, block_size: int) -> torch.Tensor:
    """Outputs that predict each token under the 'next' shift.

    out_noisy [N, L, H] (outputs at the noisy positions); boundary [N, nb, H] (for block b: the output at the
    position just before the block, from the clean copy or the prefix) -> [N, L, H].
    """
    n, L, h = out_noisy.shape
    nb = L // block_size
    within = out_noisy.reshape(n, nb, block_size, h)[:, :, :-1]  # positions 0..B-2 predict 1..B-1
    return torch.cat([boundary[:, :, None], within], dim=2).reshape(n, L, h)  # [N, nb, B, H] -> [N, L, H]


def training_block_size(cfg, generator=None) -> int:
    """The block size of this training step: block_size, or one of train_block_sizes drawn with `generator`."""
    sizes = cfg.block_sizes
    if len(sizes) == 1:
        return sizes[0]
    return sizes[int(torch.randint(len(sizes), (1,), generator=generator))]


def compute_loss(policy: BlockVLAPolicy, batch: Batch, mode: Optional[str] = None, generator=None):
    """-> (loss, info dict). mode defaults to policy.config.train_mode. With train_block_sizes, a blockdiff call draws
    its block size from `generator` (before the mask sampling, so a seeded step is reproducible)."""
    cfg = policy.config
    mode = mode or cfg.train_mode
    if batch.actions.shape[1] != cfg.n_action_tokens:
        raise ValueError(f'batch has {batch.actions.shape[1]} action tokens per sample, the policy expects '
                         f'{cfg.n_action_tokens} (chunk_len {cfg.chunk_len} x action_dim {cfg.action_dim})')
    prefix, prefix_valid = policy.prefix_from_inputs(batch.pixels, batch.text_ids, batch.text_valid, batch.state)
    n, p, _ = prefix.shape
    L, B = cfg.n_action_tokens, cfg.block_size
    clean = batch.actions
    if mode == 'ar':
        return _ar_loss(policy, prefix, prefix_valid, clean)
    if mode == 'blockdiff':
        B = training_block_size(cfg, generator)
    block = B if mode == 'blockdiff' else L  # full diffusion: one mask ratio for the whole chunk
    masked, t = sample_block_mask(n, L, block, cfg.mask_eps, generator, clean.device)
    noisy = torch.where(masked, torch.full_like(clean, cfg.mask_token_id), clean)
    parts = [prefix, policy.action_embed(noisy)]
    if mode == 'blockdiff':
        parts.append(policy.action_embed(clean))
    elif mode != 'fulldiff':
        raise ValueError(f"unknown training mode {mode!r} (expected 'blockdiff', 'ar' or 'fulldiff')")
    embeds = torch.cat(parts, 1)  # [N, P + copies*L, hidden]
    copies = len(parts) - 1
    mask = training_mask(prefix_valid, L, B, mode, policy.layout)
    hidden, _ = policy.run_backbone(embeds, position_ids(prefix_valid, L, copies, policy.layout), mask)
    out_noisy = hidden[:, p:p + L]  # [N, L, hidden]
    if cfg.logit_shift == 'same':
        pred = out_noisy
    elif mode == 'blockdiff':
        out_clean = hidden[:, p + L:]  # [N, L, hidden]
        ends = out_clean[:, B - 1::B][:, :-1]  # clean last token of blocks 0..nb-2: [N, nb-1, hidden]
        boundary = torch.cat([hidden[:, p - 1:p], ends], 1)  # [N, nb, hidden]
        pred = _shifted(out_noisy, boundary, B)
    else:
        pred = _shifted(out_noisy, hidden[:, p - 1:p], L)
    logits = policy.action_logits(pred)  # [N, L, n_bins]
    ce = F.cross_entropy(logits.reshape(-1, cfg.n_bins), clean.reshape(-1), reduction='none').reshape(n, L)
    weight = masked.float()
    if cfg.loss_weighting == 'elbo':
        weight = weight / t.clamp(min=cfg.elbo_t_min)
    loss = (ce * weight).sum() / masked.sum().clamp(min=1)
    with torch.no_grad():
        acc = ((logits.argmax(-1) == clean) & masked).sum() / masked.sum().clamp(min=1)
    return loss, {'loss': float(loss.detach()), 'masked_acc': float(acc), 'mask_frac': float(masked.float().mean())}


def _ar_loss(policy, prefix, prefix_valid, clean):
    """Next-token CE over every action token; token 0 is read at the last prefix position."""
    cfg = policy.config
    n, p, _ = prefix.shape
    L = cfg.n_action_tokens
    embeds = torch.cat([prefix, policy.action_embed(clean)], 1)  # [N, P + L, hidden]
    mask = training_mask(prefix_valid, L, cfg.block_size, 'ar', policy.layout)
    hidden, _ = policy.run_backbone(embeds, position_ids(prefix_valid, L, 1, policy.layout), mask)
    logits = policy.action_logits(hidden[:, p - 1:p + L - 1])  # [N, L, n_bins]
    loss = F.cross_entropy(logits.reshape(-1, cfg.n_bins), clean.reshape(-1))
    with torch.no_grad():
        acc = (logits.argmax(-1) == clean).float().mean()
    return loss, {'loss': float(loss.detach()), 'masked_acc': float(acc), 'mask_frac': 1.0}
