"""A pretrained VLM as the policy's backbone: its parts become BlockVLAPolicy's modules.

    policy.llm        the VLM's language model (LoRA targets it like any backbone)
    policy.vision     its vision tower + connector (the tower frozen unless model.vlm_freeze_vision is false)
    policy.projector  identity: the connector already maps into the language model's embedding space
    policy.layout     its prompt layout (model.vlm.layout.PromptLayout)
    policy.softcap    its LM head's final logit soft-capping (Gemma2), applied to the action logits too

The config the policy keeps is resolved: the prompt layout and the fixed-resolution processor config are written
into it, so a checkpoint rebuilds the same policy without the original folder (`portable`).
"""
from __future__ import annotations

import logging

from torch import nn

from .load import load_vlm, vlm_config_dict

log = logging.getLogger(__name__)


def attach_vlm(policy, config):
    """Build the VLM named by `config` into `policy`; -> (the LM head weight or None, the resolved config)."""
    parts = load_vlm(config.vlm_path, None if config.vlm_path else config.vlm, slot_len=config.max_text_tokens,
                     state=bool(config.state_dim), image_size=config.vlm_image_size, layout=config.vlm_layout,
                     processor=config.vlm_processor, attn_implementation=config.attn_implementation,
                     seed=config.seed)
    policy.llm = parts.language_model
    policy.vision = parts.vision
    policy.projector = nn.Identity()
    policy.layout = parts.layout
    policy.softcap = parts.softcap
    policy.vlm_family = parts.family.name
    policy.vlm_hf_config = parts.hf_config
    connector = getattr(parts.vision, 'connector_in_tower', ())
    for name, p in parts.vision.tower.named_parameters():  # the connector always trains
        p.requires_grad = not config.vlm_freeze_vision or name.startswith(connector)
    resolved = config.replace(vlm_layout=parts.layout.to_dict(), vlm_processor=parts.processor)
    log.info('VLM backbone %s (%s): %d image tokens, prefix %d, vision tower %s', parts.hf_config.model_type,
             parts.family.name, parts.layout.n_image_tokens, parts.layout.length,
             'frozen' if config.vlm_freeze_vision else 'trained')
    return parts.lm_head, resolved


def portable(policy, config):
    """`config` with the VLM described inline (its config dict; no dependency on the original folder)."""
    return config.replace(vlm=vlm_config_dict(policy.vlm_hf_config), vlm_path=None)
