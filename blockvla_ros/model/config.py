"""BlockVLAConfig: everything that defines a policy's shapes and decoding, validated and saved with it."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..io.atomic import atomic_write_text
from .attention_windows import check_windows

DECODERS = ('blockdiff', 'ar', 'fulldiff', 'fulldiff_nocache')
SCHEDULES = ('fixed', 'threshold')
LOGIT_SHIFTS = ('next', 'same')
PREFIX_ORDERS = ('text_first', 'image_first')
POS_EMBEDS = ('learned', 'sincos')  # vision.pos_embed: initial value of the patch position embedding
TRAIN_MODES = ('blockdiff', 'ar', 'fulldiff')
# transformers attention implementations the policy can run: sdpa takes our bool masks as they are; eager gets
# them as additive float masks (model.policy converts). Gemma2 supports eager only (softcapping).
ATTN_IMPLEMENTATIONS = ('sdpa', 'eager')
# integer fields and their upper bounds (beyond these a policy is not a policy but a memory bomb)
INT_FIELDS = {'action_dim': 1024, 'chunk_len': 4096, 'n_bins': 65536, 'block_size': 65536, 'steps_per_block': 65536,
              'image_size': 8192, 'max_text_tokens': 65536, 'fulldiff_steps': 65536}
BACKBONE_SIZES = {'vocab_size': 1 << 24, 'hidden_size': 1 << 16, 'intermediate_size': 1 << 18,
                  'num_hidden_layers': 1024, 'num_attention_heads': 1024, 'num_key_value_heads': 1024,
                  'head_dim': 4096, 'max_position_embeddings': 1 << 24}
ACTION_KINDS = ('absolute', 'delta')  # per action dimension: a target to reach, or an increment per control tick


@dataclass
class BlockVLAConfig:
    """One policy's architecture, action space and decoding. Saved as policy.yaml / config.json next to weights."""

    # --- backbone -------------------------------------------------------------------------------------------
    backbone: dict = field(default_factory=lambda: {  # HF config kwargs (model_type + sizes) for a random init
        'model_type': 'qwen2', 'vocab_size': 512, 'hidden_size': 64, 'intermediate_size': 128,
        'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
        'max_position_embeddings': 1024})
    backbone_path: Optional[str] = None  # local HF folder (save_pretrained layout); overrides `backbone`
    text_tokenizer: str = 'byte'  # 'byte' (no files) or 'auto' (backbone_path's tokenizer; a VLM's tokenizer.json)
    max_text_tokens: int = 48  # instruction tokens in the prefix (static shape); longer is an error
    attn_implementation: str = 'sdpa'  # the backbone's attention: sdpa | eager (Gemma2 supports eager only)
    # sliding windows that bind on this policy's sequence, one mask row each ([] | [W] | [None, W]); resolved from the
    # backbone when the policy is built and saved with it (model.attention_windows), so the runtime needs no HF config
    attention_windows: list = field(default_factory=list)
    # --- a pretrained VLM as the backbone (replaces backbone + vision; see model.vlm) ----------------------------
    vlm: Optional[dict] = None  # HF config kwargs of a VLM (model_type + text/vision configs) for a random init
    vlm_path: Optional[str] = None  # local VLM folder (save_pretrained layout; never remote code); overrides `vlm`
    vlm_image_size: Optional[list] = None  # [H, W] for families free in resolution (Qwen2-VL; default 224 x 224)
    vlm_freeze_vision: bool = True  # keep the VLM's vision tower frozen (its connector still trains)
    vlm_layout: Optional[dict] = None  # the VLM's prompt layout, resolved when the policy is built (saved with it)
    vlm_processor: Optional[dict] = None  # its image processor config at the fixed resolution (resolved, saved)
    # --- vision ---------------------------------------------------------------------------------------------
    vision: dict = field(default_factory=lambda: {'type': 'patch', 'patch_size': 8, 'dim': 64})
    image_size: int = 64  # square input resolution; other sizes are resized by the runtime
    image_mean: tuple = (0.5, 0.5, 0.5)  # per-channel normalization after /255
    image_std: tuple = (0.5, 0.5, 0.5)
    # --- action space ---------------------------------------------------------------------------------------
    action_dim: int = 3  # D: values per timestep
    chunk_len: int = 8  # H: timesteps per chunk; H*D action tokens
    n_bins: int = 256  # uniform bins per dimension between the 1st and 99th percentile
    state_dim: int = 0  # proprioceptive inputs (0 = none); one prefix token
    action_names: list = field(default_factory=list)  # len D when given
    action_kinds: list = field(default_factory=list)  # len D: 'absolute' | 'delta' per dim; empty: all absolute
    state_names: list = field(default_factory=list)
    control_rate_hz: Optional[float] = None  # rate the training data was aligned at (data.rate_hz); None: unknown
    # --- block diffusion ------------------------------------------------------------------------------------
    block_size: int = 6  # B tokens per block; H*D must be a multiple (B = D makes a block one timestep)
    # block sizes the policy is trained with, one drawn per training step (empty: block_size only); decoding may use
    # any of them (block_size is the default), so calibration can pick bigger blocks where the policy allows
    train_block_sizes: list = field(default_factory=list)
    decoder: str = 'blockdiff'  # default decoder at inference: blockdiff | ar | fulldiff | fulldiff_nocache
    steps_per_block: int = 4  # refine passes per block (fixed schedule) or the maximum (threshold)
    schedule: str = 'threshold'  # fixed: exactly the scheduled count per step; threshold: also all >= tau
    threshold: float = 0.9  # tau for the threshold schedule
    fulldiff_steps: int = 12  # refine passes over the whole chunk for the full-sequence diffusion baselines
    logit_shift: str = 'next'  # 'next': token i is read at position i-1 (reuses AR pretraining); 'same': at i
    prefix_order: str = 'text_first'  # text before image, so an unchanged instruction's KV can be reused
    # --- training -------------------------------------------------------------------------------------------
    train_mode: str = 'blockdiff'  # blockdiff | ar | fulldiff: which loss trains this policy
    mask_eps: float = 1e-3  # mask ratio p = (1-eps) t + eps, t ~ U(0, 1)
    loss_weighting: str = 'mean'  # 'mean' CE over masked tokens, or 'elbo' (1/t, clipped at t_min)
    elbo_t_min: float = 0.1  # lower clip of t for the 1/t weight
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.image_mean, list):
            self.image_mean = tuple(self.image_mean)
        if isinstance(self.image_std, list):
            self.image_std = tuple(self.image_std)
        self.validate()

    # ------------------------------------------------------------------------------------------------------
    @property
    def kinds(self) -> list:
        """'absolute' | 'delta' for each action dimension (absolute where the config does not say)."""
        return list(self.action_kinds) or ['absolute'] * self.action_dim

    @property
    def n_action_tokens(self) -> int:
        return self.chunk_len * self.action_dim

    @property
    def block_sizes(self) -> list:
        """The block sizes this policy was trained with (and may decode with), ascending."""
        return sorted(set(self.train_block_sizes)) or [self.block_size]

    @property
    def n_blocks(self) -> int:
        return self.n_action_tokens // self.block_size

    @property
    def mask_token_id(self) -> int:
        """Action token ids are 0..n_bins-1; the [MASK] id follows them."""
        return self.n_bins

    @property
    def is_vlm(self) -> bool:
        return self.vlm is not None or self.vlm_path is not None

    def _resolved_layout(self) -> dict:
        if self.vlm_layout is None:
            raise ValueError('BlockVLAConfig: the VLM prompt layout is resolved when the policy is built (from '
                             'vlm_path / vlm); use the built policy\'s config')
        return self.vlm_layout

    @property
    def n_image_tokens(self) -> int:
        if self.is_vlm:
            return sum(s['length'] for s in self._resolved_layout()['segments'] if s['source'] == 'image')
        if self.vision.get('type', 'patch') == 'patch':
            return (self.image_size // int(self.vision['patch_size'])) ** 2
        return int(self.vision['num_tokens'])

    @property
    def prefix_len(self) -> int:
        """Static prefix length P: text slots + image tokens + one state token if any (a VLM: its prompt)."""
        if self.is_vlm:
            return sum(s['length'] for s in self._resolved_layout()['segments'])
        return self.max_text_tokens + self.n_image_tokens + (1 if self.state_dim else 0)

    @property
    def max_seq_len(self) -> int:
        return self.prefix_len + self.n_action_tokens

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f'BlockVLAConfig: {msg}')

        self._validate_types(need)
        need(self.state_dim >= 0, f'state_dim must be >= 0, got {self.state_dim}')
        need(self.n_bins >= 2, f'n_bins must be >= 2, got {self.n_bins}')
        need(self.n_action_tokens % self.block_size == 0,
             f'chunk_len*action_dim = {self.chunk_len}*{self.action_dim} = {self.n_action_tokens} action tokens '
             f'is not divisible by block_size {self.block_size}')
        bad_sizes = [b for b in self.train_block_sizes if self.n_action_tokens % b]
        need(not bad_sizes, f'train_block_sizes {bad_sizes} do not divide the {self.n_action_tokens} action tokens')
        need(not self.train_block_sizes or self.block_size in self.train_block_sizes,
             f'block_size {self.block_size} is not one of train_block_sizes {self.train_block_sizes}')
        need(self.steps_per_block <= self.block_size,
             f'steps_per_block {self.steps_per_block} > block_size {self.block_size}: a step must unmask a token')
        need(self.decoder in DECODERS, f'decoder must be one of {DECODERS}, got {self.decoder!r}')
        need(self.schedule in SCHEDULES, f'schedule must be one of {SCHEDULES}, got {self.schedule!r}')
        need(0.0 < self.threshold <= 1.0, f'threshold must be in (0, 1], got {self.threshold}')
        need(self.logit_shift in LOGIT_SHIFTS, f'logit_shift must be one of {LOGIT_SHIFTS}')
        need(self.prefix_order in PREFIX_ORDERS, f'prefix_order must be one of {PREFIX_ORDERS}')
        need(self.train_mode in TRAIN_MODES, f'train_mode must be one of {TRAIN_MODES}')
        need(self.loss_weighting in ('mean', 'elbo'), "loss_weighting must be 'mean' or 'elbo'")
        need(0.0 <= self.mask_eps < 1.0, 'mask_eps must be in [0, 1)')
        need(self.action_names == [] or len(self.action_names) == self.action_dim,
             f'action_names has {len(self.action_names)} names but action_dim is {self.action_dim}')
        need(isinstance(self.action_kinds, list) and len(self.action_kinds) in (0, self.action_dim),
             f'action_kinds must list one kind per action dimension ({self.action_dim}), got {self.action_kinds!r}')
        bad_kinds = [k for k in self.action_kinds if k not in ACTION_KINDS]
        need(not bad_kinds, f'action_kinds must each be one of {ACTION_KINDS}, got {bad_kinds}')
        rate = self.control_rate_hz
        need(rate is None or (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0.0 < rate <= 10000.0),
             f'control_rate_hz must be a number of Hz in (0, 10000] or null, got {rate!r}')
        need(self.state_names == [] or len(self.state_names) == self.state_dim,
             f'state_names has {len(self.state_names)} names but state_dim is {self.state_dim}')
        vtype = self.vision.get('type', 'patch')
        need(vtype in ('patch', 'hf'), f"vision.type must be 'patch' or 'hf', got {vtype!r}")
        if vtype == 'patch':
            patch = int(self.vision.get('patch_size', 0))
            need(patch > 0 and self.image_size % patch == 0,
                 f'image_size {self.image_size} must be a multiple of vision.patch_size {patch}')
            pos = self.vision.get('pos_embed', 'learned')
            need(pos in POS_EMBEDS, f"vision.pos_embed must be 'learned' or 'sincos', got {pos!r}")
            need(pos != 'sincos' or int(self.vision.get('dim', 0)) % 4 == 0,
                 f"vision.pos_embed sincos needs vision.dim divisible by 4, got {self.vision.get('dim')}")
        else:
            need('num_tokens' in self.vision, 'vision.num_tokens is required for an HF vision encoder')
        init = self.vision.get('init_from')
        need(init is None or isinstance(init, str), f'vision.init_from must be a file path, got {init!r}')
        need(self.backbone_path is not None or 'model_type' in self.backbone,
             'either backbone_path or backbone.model_type must be given')
        need(self.text_tokenizer in ('byte', 'auto'), "text_tokenizer must be 'byte' or 'auto'")
        need(self.attn_implementation in ATTN_IMPLEMENTATIONS,
             f'attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}')
        bad_windows = check_windows(self.attention_windows)
        need(bad_windows is None, bad_windows)
        self._validate_vlm(need)

    def _validate_vlm(self, need):
        if not self.is_vlm:
            need(self.vlm_layout is None and self.vlm_processor is None,
                 'vlm_layout / vlm_processor belong to a VLM backbone (vlm_path or vlm)')
            return
        need(self.backbone_path is None, 'give either a VLM (vlm_path / vlm) or backbone_path, not both')
        need(self.vlm is None or (isinstance(self.vlm, dict) and 'model_type' in self.vlm),
             f'vlm must be a config dict with a model_type, got {self.vlm!r}')
        size = self.vlm_image_size
        need(size is None or (isinstance(size, (list, tuple)) and len(size) == 2
                              and all(isinstance(v, int) and v > 0 for v in size)),
             f'vlm_image_size must be [height, width] in pixels, got {size!r}')
        need(isinstance(self.vlm_freeze_vision, bool), 'vlm_freeze_vision must be true or false')
        need(self.vlm_path is not None or self.text_tokenizer == 'byte' or self.vlm_layout is not None,
             "a VLM config dict without a folder has no tokenizer files: use text_tokenizer 'byte'")
        for name in ('vlm_layout', 'vlm_processor'):
            value = getattr(self, name)
            need(value is None or isinstance(value, dict), f'{name} must be a mapping, got {type(value).__name__}')
        need((self.vlm_layout is None) == (self.vlm_processor is None),
             'vlm_layout and vlm_processor are resolved together')
        if self.vlm_layout is not None:  # a saved policy's: checked here, so a bad one never reaches a runtime
            from ..runtime.image_processors import build_image_processor
            from .vlm.layout import PromptLayout

            try:
                layout = PromptLayout.from_dict(self.vlm_layout)
                build_image_processor(self.vlm_processor)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                need(False, f'vlm_layout / vlm_processor: {type(e).__name__}: {e}')
            need(layout.slot_len == self.max_text_tokens and layout.has_state == bool(self.state_dim),
                 f'vlm_layout (instruction slot {layout.slot_len}, state {layout.has_state}) does not match '
                 f'max_text_tokens {self.max_text_tokens} / state_dim {self.state_dim}')

    def _validate_types(self, need) -> None:
        """Every field's type and a sane range, before any arithmetic on them (a policy.yaml is input too)."""
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return (is_int(v) or isinstance(v, float)) and math.isfinite(v) and abs(v) <= 1e6

        for name, high in INT_FIELDS.items():
            value = getattr(self, name)
            need(is_int(value) and 0 < value <= high, f'{name} must be a positive integer <= {high}, got {value!r:.60}')
        need(is_int(self.state_dim) and 0 <= self.state_dim <= 4096,
             f'state_dim must be an integer in [0, 4096], got {self.state_dim!r:.60}')
        need(is_int(self.seed), f'seed must be an integer, got {self.seed!r:.60}')
        for name in ('threshold', 'mask_eps', 'elbo_t_min'):
            need(is_num(getattr(self, name)), f'{name} must be a finite number, got {getattr(self, name)!r:.60}')
        for name in ('text_tokenizer', 'decoder', 'schedule', 'logit_shift', 'prefix_order', 'train_mode',
                     'loss_weighting', 'attn_implementation'):
            need(isinstance(getattr(self, name), str), f'{name} must be a string, got {getattr(self, name)!r:.60}')
        need(self.backbone_path is None or isinstance(self.backbone_path, str),
             f'backbone_path must be a folder path or null, got {self.backbone_path!r:.60}')
        for name in ('image_mean', 'image_std'):
            value = getattr(self, name)
            need(isinstance(value, tuple) and len(value) == 3 and all(is_num(v) for v in value),
                 f'{name} must be 3 finite numbers, got {value!r:.60}')
        need(all(v > 0 for v in self.image_std), f'image_std must be > 0, got {self.image_std}')
        for name in ('action_names', 'state_names'):
            value = getattr(self, name)
            need(isinstance(value, list) and all(isinstance(v, str) for v in value),
                 f'{name} must be a list of strings, got {value!r:.60}')
        sizes = self.train_block_sizes
        need(isinstance(sizes, list) and len(sizes) <= 64 and all(is_int(b) and 0 < b <= 65536 for b in sizes),
             f'train_block_sizes must be a list of at most 64 positive integers, got {sizes!r:.60}')
        for name in ('backbone', 'vision'):
            value = getattr(self, name)
            need(isinstance(value, dict) and all(isinstance(k, str) for k in value),
                 f'{name} must be a mapping, got {value!r:.60}')
        for key, value in self.backbone.items():
            if key in BACKBONE_SIZES:
                need(is_int(value) and 0 < value <= BACKBONE_SIZES[key],
                     f'backbone.{key} must be an integer in [1, {BACKBONE_SIZES[key]}], got {value!r:.60}')
        need(isinstance(self.backbone.get('model_type', ''), str), 'backbone.model_type must be a string')
        need(isinstance(self.vision.get('type', 'patch'), str), 'vision.type must be a string')
        for key in ('patch_size', 'dim', 'num_tokens'):
            if key in self.vision:
                need(is_int(self.vision[key]) and 0 < self.vision[key] <= 1 << 16,
                     f'vision.{key} must be a positive integer, got {self.vision[key]!r:.60}')
        need(isinstance(self.vision.get('pos_embed', 'learned'), str), 'vision.pos_embed must be a string')
        need(self.vision.get('path') is None or isinstance(self.vision['path'], str),
             f"vision.path must be a folder path, got {self.vision.get('path')!r:.60}")
        tower = self.vision.get('config', {})
        need(isinstance(tower, dict) and isinstance(tower.get('model_type', ''), str),
             f'vision.config must be a mapping with a model_type string, got {tower!r:.60}')

    # ------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out['image_mean'] = list(self.image_mean)
        out['image_std'] = list(self.image_std)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> 'BlockVLAConfig':
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise ValueError(f'BlockVLAConfig: expected a mapping of config keys, got {type(data).__name__}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f'BlockVLAConfig: unknown keys {unknown}')
        return cls(**data)

    def replace(self, **changes) -> 'BlockVLAConfig':
        return BlockVLAConfig.from_dict({**self.to_dict(), **changes})

    def save(self, path: str | os.PathLike) -> None:
        """Write as YAML (.yaml/.yml) or JSON, atomically."""
        path = Path(path)
        text = (yaml.safe_dump(self.to_dict(), sort_keys=False) if path.suffix in ('.yaml', '.yml')
                else json.dumps(self.to_dict(), indent=2))
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> 'BlockVLAConfig':
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'config file not found: {path}')
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == '.json' else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f'{path}: cannot parse ({e})') from e
        if not isinstance(data, dict):
            raise ValueError(f'{path}: expected a mapping of config keys')
        return cls.from_dict(data)
