"""LoRA on the backbone through `peft` (injected in place, so BlockVLAPolicy code is unchanged).

Only the adapters of the backbone train; the vision encoder, projector, state projection and action embedding /
head (which holds the [MASK] row) stay fully trainable. Checkpoints for resume keep the adapters; the policy folder
gets the merged weights (W + B A * alpha / r) under the plain BlockVLAPolicy names, so the exporter never sees peft.
"""
from __future__ import annotations

import logging

from .config import LoraConfig

log = logging.getLogger(__name__)

ADAPTER = 'default'


def apply_lora(policy, cfg: LoraConfig) -> None:
    """Inject LoRA adapters into policy.llm (in place) and freeze the rest of the backbone."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model
    except ImportError as e:
        raise ImportError('train.lora.enabled needs the `peft` package, which is not installed '
                          '(pip install peft), or set train.lora.enabled=false') from e
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), bias='none', use_rslora=False)
    try:
        inject_adapter_in_model(peft_cfg, policy.llm, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f'train.lora.target_modules {list(cfg.target_modules)}: {e}') from e
    trainable = 0
    for name, p in policy.llm.named_parameters():
        p.requires_grad = 'lora_' in name
        trainable += p.numel() if p.requires_grad else 0
    log.info('LoRA r=%d alpha=%g on %s: %.2fM trainable backbone parameters', cfg.r, cfg.alpha,
             list(cfg.target_modules), trainable / 1e6)


def merge_lora_state(state: dict, cfg: LoraConfig) -> dict:
    """A state dict with peft LoRA layers -> plain names with merged weights.

    '<m>.base_layer.weight' + '<m>.lora_A.default.weight' [r, in] + '<m>.lora_B.default.weight' [out, r]
    -> '<m>.weight' = W + (B @ A) * alpha / r (fp32 at least); '<m>.base_layer.bias' -> '<m>.bias'.
    """
    scale = cfg.alpha / cfg.r
    out = {}
    for key, value in state.items():
        if '.lora_A.' in key or '.lora_B.' in key or '.lora_dropout' in key:
            continue
        if '.base_layer.' not in key:
            out[key] = value
            continue
        module, param = key.rsplit('.base_layer.', 1)
        if param == 'weight':
            a = state.get(f'{module}.lora_A.{ADAPTER}.weight')
            b = state.get(f'{module}.lora_B.{ADAPTER}.weight')
            if a is None or b is None:
                raise ValueError(f'LoRA layer {module} has no lora_A/lora_B weights for adapter {ADAPTER!r}')
            merged = value.float() + (b.float() @ a.float()) * scale  # [out, r] @ [r, in] -> [out, in]
            # a bf16-stored frozen base (train.frozen_dtype) merges into fp32: bf16 would round the small update away
            value = merged if value.element_size() < 4 else merged.to(value.dtype)
        out[f'{module}.{param}'] = value
    return out
