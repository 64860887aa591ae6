"""What makes a real-size backbone (0.5-7B) fit in training memory, besides LoRA and FSDP.

- gradient checkpointing: each backbone decoder layer keeps only its input for backward and recomputes the rest
  (HF's own mechanism, non-reentrant, so frozen inputs, LoRA and FSDP work); activation memory drops from
  ~layers x per-layer to ~one layer, for ~1.3x the compute.
- bf16 frozen weights (train.frozen_dtype=bf16, with train.precision=bf16): weights that do not train (the backbone
  under LoRA) are stored in bf16, half the bytes; they are only ever read inside bf16 autocast, so the compute is
  what autocast does anyway. Trained weights stay fp32 (AdamW updates need it); LoRA merges into fp32 weights.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def enable_gradient_checkpointing(policy) -> None:
    """Recompute the backbone's decoder layers in backward (policy.llm is an HF PreTrainedModel)."""
    llm = policy.llm
    if not getattr(llm, 'supports_gradient_checkpointing', False):
        raise ValueError(f'train.gradient_checkpointing: the {llm.config.model_type} backbone does not support '
                         'gradient checkpointing in transformers; set train.gradient_checkpointing=false')
    llm.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})
    log.info('gradient checkpointing on the backbone layers')


def store_frozen_weights(policy, dtype_name: str) -> int:
    """Cast parameters that do not train to `dtype_name` (fp32 | bf16) in place. -> bytes saved."""
    import torch

    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[dtype_name]
    saved = 0
    for p in policy.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            saved += p.numel() * (p.element_size() - torch.empty((), dtype=dtype).element_size())
            p.data = p.data.to(dtype)
    if saved:
        log.info('frozen weights stored as %s: %.2f GB less', dtype_name, saved / 1e9)
    return saved
