"""BlockVLAPolicy: vision encoder + projector + any HF causal-LM backbone + action embeddings/head over the bins.

The backbone's own LM head (a 32k-150k vocabulary) is not kept: the action head predicts only the n_bins action
tokens, and is initialised from the LM head rows of the last n_bins vocabulary ids (OpenVLA's action-token rows),
so finetuning starts from what the AR checkpoint already knows; the head's final logit soft-capping (Gemma2's
`final_logit_softcapping`) is kept, so the action logits start as the causal LM's own over those rows.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..paths import pretrained_folder
from .attention_windows import for_layers, mask_windows
from .config import ATTN_IMPLEMENTATIONS, BlockVLAConfig
from .masks import windowed
from .prefix_layout import layout_for
from .vision import build_vision_encoder

log = logging.getLogger(__name__)


def build_backbone(config: BlockVLAConfig):
    """The HF base model (no LM head) and the causal LM's output embedding (for head init).

    Attention: `config.attn_implementation` (sdpa by default; Gemma2 supports eager only)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise ImportError('the model needs transformers: pip install transformers') from e
    attn = config.attn_implementation
    try:
        if config.backbone_path:
            path = pretrained_folder(config.backbone_path, 'model.backbone_path')
            hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            if getattr(hf_cfg, 'vision_config', None) is not None:
                raise ValueError(f'model.backbone_path {path} holds a {hf_cfg.model_type} vision-language model: '
                                 'give a VLM as model.vlm_path (README "Start from your VLM"); backbone_path takes a '
                                 'text-only causal LM')
            lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation=attn,
                                                      dtype=torch.float32)
        else:
            spec = dict(config.backbone)
            hf_cfg = AutoConfig.for_model(spec.pop('model_type'), **spec)
            torch.manual_seed(config.seed)
            lm = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn)
    except ValueError as e:
        if 'attn_implementation' not in str(e) and 'attention implementation' not in str(e):
            raise
        others = [a for a in ATTN_IMPLEMENTATIONS if a != attn]
        raise ValueError(f'attn_implementation {attn!r} is not supported by this backbone ({e}); set '
                         f'model.attn_implementation to one of {others}') from None
    head = lm.get_output_embeddings()  # read once for the action rows; no copy (a 0.5B vocab head is 0.5 GB)
    return lm.base_model, (head.weight.detach() if head is not None else None)


def attention_mask_for(mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Our bool mask (True = attend) in the convention of the attention implementation.

    sdpa takes it as it is; eager ADDS the mask to the scores, so a bool mask would be silently wrong there
    (True adds 1): it gets 0 where attended and the dtype's most negative value elsewhere."""
    if attn_implementation != 'eager' or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def backbone_spec(base_model) -> dict:
    """A config dict that rebuilds `base_model` (a backbone or a vision tower) without the original folder (saved
    with checkpoints)."""
    d = base_model.config.to_diff_dict()
    for k in ('architectures', 'transformers_version', '_name_or_path', 'torch_dtype', 'dtype'):
        d.pop(k, None)
    d['model_type'] = base_model.config.model_type
    return d


class BlockVLAPolicy(nn.Module):
    def __init__(self, config: BlockVLAConfig):
        super().__init__()
        self.config = config
        self.softcap = None  # the LM head's final logit soft-capping (Gemma2), kept for the action head
        if config.is_vlm:  # a pretrained VLM: its vision tower + connector, its language model, its prompt layout
            from .vlm.attach import attach_vlm

            lm_head, self.config = attach_vlm(self, config)
            hidden = self.llm.config.hidden_size
        else:
            self.layout = layout_for(config)  # model.prefix_layout: the prefix's segments, positions, attention
            self.llm, lm_head = build_backbone(config)
            self.softcap = getattr(self.llm.config, 'final_logit_softcapping', None)
            hidden = self.llm.config.hidden_size
            self.vision = build_vision_encoder(config.vision, config.image_size)
            self.projector = nn.Sequential(nn.Linear(self.vision.out_dim, hidden), nn.GELU(),
                                           nn.Linear(hidden, hidden))
        self.hidden_size = hidden
        self.config = self.config.replace(  # resolved from the backbone, saved with the policy
            attention_windows=mask_windows(self.llm.config, self.config.max_seq_len, self.layout.rope_dims))
        self.state_proj = nn.Linear(config.state_dim, hidden) if config.state_dim else None
        self.action_embed = nn.Embedding(config.n_bins + 1, hidden)  # bins + [MASK]
        self.action_head = nn.Linear(hidden, config.n_bins)
        self._init_action_rows(lm_head)

    @torch.no_grad()
    def _init_action_rows(self, lm_head: Optional[torch.Tensor]):
        n = self.config.n_bins
        table = self.llm.get_input_embeddings()
        vocab = table.weight.shape[0]
        if vocab >= n:  # what the embedding module outputs (Gemma's scales its rows by sqrt(hidden))
            rows = table(torch.arange(vocab - n, vocab, device=table.weight.device))
            self.action_embed.weight[:n] = rows
            scale = 1.0 if type(table) is nn.Embedding else float(rows.norm() / table.weight[-n:].norm())
            self.action_embed.weight[n] = table.weight.mean(0) * scale  # [MASK]: the mean row
        if lm_head is not None and lm_head.shape[0] >= n and lm_head.shape[1] == self.hidden_size:
            self.action_head.weight.copy_(lm_head[-n:])
            self.action_head.bias.zero_()

    # --------------------------------------------------------------------------------------------------------
    @property
    def kv_shape(self) -> tuple:
        """(layers, kv_heads, head_dim) of the backbone's cache."""
        c = self.llm.config
        heads = c.num_attention_heads
        head_dim = getattr(c, 'head_dim', None) or c.hidden_size // heads
        return c.num_hidden_layers, getattr(c, 'num_key_value_heads', None) or heads, head_dim

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, ...] (the image processor's output) -> image tokens [N, n_image_tokens, hidden]."""
        return self.projector(self.vision(pixels))

    def embed_prefix(self, text_ids: torch.Tensor, text_valid: torch.Tensor, image_tokens: torch.Tensor,
                     state: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prefix embeddings [N, P, hidden] and validity [N, P]: the layout's segments in order (template ids,
        image tokens, the instruction slot, the state)."""
        n = text_ids.shape[0]
        table = self.llm.get_input_embeddings()
        parts = []
        for seg in self.layout.segments:
            if seg.source == 'text':
                parts.append(table(text_ids))  # [N, Lt, hidden]
            elif seg.source == 'image':
                parts.append(image_tokens)  # [N, Ni, hidden]
            elif seg.source == 'state':
                if state is None:
                    raise ValueError(f'this policy reads a {self.config.state_dim}-dim proprioceptive state; '
                                     'none given')
                parts.append(self.state_proj(state)[:, None])  # [N, S] -> [N, 1, hidden]
            else:  # fixed template ids
                ids = torch.tensor(seg.ids, dtype=torch.long, device=text_ids.device)
                parts.append(table(ids)[None].expand(n, -1, -1))  # [len] -> [N, len, hidden]
        valid = torch.from_numpy(self.layout.valid(text_valid.detach().cpu().numpy())).to(text_valid.device)
        return torch.cat(parts, 1), valid

    def prefix_from_inputs(self, pixels, text_ids, text_valid, state=None):
        return self.embed_prefix(text_ids, text_valid, self.encode_image(pixels), state)

    def run_backbone(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache=None):
        """One backbone pass with an explicit bool mask [N, 1, Q, K] (True = attend) -> (hidden, cache).

        The backbone's sliding windows are applied to the mask by position (model.attention_windows)."""
        windows = self.config.attention_windows
        if windows and cache is not None:
            raise ValueError('run_backbone applies sliding windows to uncached forwards only; decode through '
                             'model.graphs.BackboneGraph')
        rows = [attention_mask_for(m, self.config.attn_implementation, embeds.dtype)
                for m in windowed(mask, positions, windows)]
        out = self.llm(inputs_embeds=embeds, attention_mask=for_layers(rows, windows), position_ids=positions,
                       past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state, out.past_key_values

    def action_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.action_head(hidden)  # [..., hidden] -> [..., n_bins]
        if self.softcap:  # as the causal LM's head: c * tanh(logits / c)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # --------------------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """config.json (with a self-contained backbone spec) + model.safetensors, each written atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.portable_config().save(folder / 'config.json')
        tmp = folder / '.model.safetensors.tmp'
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / 'model.safetensors')

    def portable_config(self) -> BlockVLAConfig:
        """This policy's config with the backbone and an HF vision tower described inline (no dependency on the
        original folders: a policy folder's config names no path outside it; a VLM: its config dict)."""
        if self.config.is_vlm:
            from .vlm.attach import portable

            return portable(self, self.config)
        vision = dict(self.config.vision)
        if vision.get('path'):
            vision.pop('path')
            vision['config'] = backbone_spec(self.vision.model)
        return self.config.replace(backbone=backbone_spec(self.llm), backbone_path=None, vision=vision)

    @classmethod
    def load(cls, folder: str | os.PathLike, config: Optional[BlockVLAConfig] = None) -> 'BlockVLAPolicy':
        """Build from config.json and read model.safetensors into it tensor by tensor (model.weights_file: no mapped
        copy of the file held next to the model)."""
        from .weights_file import read_into

        folder = Path(folder)
        weights = folder / 'model.safetensors'
        if not weights.is_file():
            raise FileNotFoundError(f'no model.safetensors in {folder}')
        config = config or BlockVLAConfig.load(folder / 'config.json')
        policy = cls(config)
        read_into(weights, policy.state_dict())  # views of the parameters
        return policy.eval()
