"""TrainConfig: the `model:` / `data:` / `train:` sections of a training YAML, validated, with `key.sub=value`
overrides.

    model:  BlockVLAConfig fields (`backbone_path` = a local HF AR checkpoint folder, save_pretrained layout)
    data:   bags (files / bag dirs / directories of bags), topics (a TopicMap), rate_hz, val_fraction, ...
    train:  mode, steps, batch_size, lr, warmup, grad clip, accumulation, seed, precision, lora, out_dir, intervals

Relative paths are resolved against the current directory. A documented example: config/train/example.yaml.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..io.atomic import atomic_write_text
from ..model.config import TRAIN_MODES, BlockVLAConfig

PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')
FROZEN_DTYPES = ('fp32', 'bf16')
TAILS = ('repeat', 'drop')
BAD_BAG_POLICIES = ('error', 'skip')


@dataclass
class DataConfig:
    """Where the demonstrations are and how to cut them into training windows."""

    bags: list = field(default_factory=list)  # bag dirs, .mcap/.db3 files or directories of bags (one dataset)
    topics: dict = field(default_factory=dict)  # TopicMap fields: image, instruction, action, state, action_field
    instruction: Optional[str] = None  # fixed instruction text for bags without an instruction topic
    rate_hz: float = 10.0  # control rate: ticks are aligned on header stamps at this rate
    val_fraction: float = 0.1  # share of episodes held out (split by episode, never by window)
    tail: str = 'repeat'  # windows near the episode end: 'repeat' the last action to fill H, or 'drop' them
    on_bad_bag: str = 'error'  # an unreadable bag: 'error' (stop) or 'skip' (warn, count, go on)
    use_header_stamps: bool = True  # align on header stamps (False: bag receive time)
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    val_max_windows: int = 256  # cap on validation windows (evenly spaced over the validation set)

    def validate(self):
        check_types(self, 'data')
        _need(all(isinstance(b, str) and b for b in self.bags),
              f'data.bags must be a list of paths, got {self.bags!r:.80}')
        _need(self.instruction is None or self.instruction.strip() != '',
              'data.instruction must be the task text or null (read the instruction topic)')
        _need(self.rate_hz > 0, f'data.rate_hz must be > 0, got {self.rate_hz}')
        _need(0.0 <= self.val_fraction < 1.0, f'data.val_fraction must be in [0, 1), got {self.val_fraction}')
        _need(self.tail in TAILS, f'data.tail must be one of {TAILS}, got {self.tail!r}')
        _need(self.on_bad_bag in BAD_BAG_POLICIES, f'data.on_bad_bag must be one of {BAD_BAG_POLICIES}')
        _need(isinstance(self.num_workers, int) and self.num_workers >= 0, 'data.num_workers must be an int >= 0')
        _need(self.val_max_windows > 0, 'data.val_max_windows must be > 0')
        _need(isinstance(self.bags, list), f'data.bags must be a list of paths, got {type(self.bags).__name__}')
        _need(isinstance(self.topics, dict), 'data.topics must be a mapping of TopicMap fields')
        from ..io.bag_reader import TopicMap

        known = {f.name for f in dataclasses.fields(TopicMap)}
        unknown = sorted(set(self.topics) - known)
        _need(not unknown, f'data.topics: unknown keys {unknown}; known: {sorted(known)}')
        for key, topic in self.topics.items():
            _need(topic is None or isinstance(topic, str), f'data.topics.{key} must be a topic name, got {topic!r:.60}')

    def topic_map(self):
        from ..io.bag_reader import TopicMap

        return TopicMap(**self.topics)


@dataclass
class LoraConfig:
    """Low-rank adapters on the backbone (through the `peft` package); the rest of the policy trains fully."""

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ['q_proj', 'k_proj', 'v_proj', 'o_proj',
                                                          'gate_proj', 'up_proj', 'down_proj'])

    def validate(self):
        check_types(self, 'train.lora')
        _need(all(isinstance(m, str) and m for m in self.target_modules),
              f'train.lora.target_modules must be a list of module names, got {self.target_modules!r:.80}')
        _need(isinstance(self.r, int) and self.r > 0, f'train.lora.r must be a positive int, got {self.r!r}')
        _need(self.alpha > 0, 'train.lora.alpha must be > 0')
        _need(0.0 <= self.dropout < 1.0, 'train.lora.dropout must be in [0, 1)')
        _need(bool(self.target_modules), 'train.lora.target_modules must name at least one module')


@dataclass
class TrainOptions:
    """The optimization run. `batch_size` is GLOBAL: samples per optimizer step over all processes and micro-steps."""

    mode: str = 'blockdiff'  # blockdiff | ar | fulldiff: the loss (and the default decoder of the saved policy)
    steps: int = 1000  # length of the run (the LR schedule spans this)
    batch_size: int = 32  # samples per optimizer step = processes x grad_accum x micro-batch
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.01  # not applied to biases, norms and other 1-d parameters
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    seed: int = 0  # model init, episode split, data order and mask sampling
    precision: str = 'auto'  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 (GPU or CPU autocast) | fp16
    frozen_dtype: str = 'fp32'  # fp32 | bf16: storage of the weights that do not train (the LoRA-frozen backbone)
    gradient_checkpointing: bool = False  # recompute each backbone layer in backward: activations ~1/layers
    device: str = 'auto'  # auto (GPU if present) | cpu
    out_dir: str = 'runs/blockvla'
    log_interval: int = 10  # steps between train-metric records
    eval_interval: int = 100  # steps between validation passes (also at start and end)
    save_interval: int = 500  # steps between checkpoints (also at the end or when stopped)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (0 = all)
    eval_decode_samples: int = 8  # validation windows decoded with the mode's decoder (0 = skip)
    max_steps: Optional[int] = None  # stop this invocation at this step (resume later); None = steps
    time_budget_s: Optional[float] = None  # stop (and checkpoint) after this many seconds of this invocation
    resume: str = 'auto'  # auto (latest checkpoint in out_dir, if any) | never | path to a checkpoint
    progress: bool = True  # progress bar on the main process
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self):
        check_types(self, 'train')
        _need(self.mode in TRAIN_MODES, f'train.mode must be one of {TRAIN_MODES}, got {self.mode!r}')
        for name in ('steps', 'batch_size', 'grad_accum', 'log_interval', 'eval_interval', 'save_interval'):
            value = getattr(self, name)
            _need(isinstance(value, int) and value > 0, f'train.{name} must be a positive int, got {value!r}')
        _need(self.batch_size % self.grad_accum == 0,
              f'train.batch_size {self.batch_size} must be divisible by train.grad_accum {self.grad_accum}')
        _need(self.lr > 0 and self.weight_decay >= 0 and self.grad_clip >= 0, 'train.lr must be > 0, '
              'weight_decay and grad_clip >= 0')
        _need(len(self.betas) == 2 and all(_is_number(b) and 0.0 <= b < 1.0 for b in self.betas),
              f'train.betas must be two numbers in [0, 1), got {self.betas!r:.60}')
        _need(self.seed >= 0, f'train.seed must be an int >= 0, got {self.seed}')
        _need(self.warmup_steps >= 0 and 0.0 <= self.min_lr_ratio <= 1.0, 'train.warmup_steps must be >= 0 and '
              'train.min_lr_ratio in [0, 1]')
        _need(self.precision in PRECISIONS, f'train.precision must be one of {PRECISIONS}, got {self.precision!r}')
        _need(self.frozen_dtype in FROZEN_DTYPES,
              f'train.frozen_dtype must be one of {FROZEN_DTYPES}, got {self.frozen_dtype!r}')
        _need(self.frozen_dtype == 'fp32' or self.precision == 'bf16',
              'train.frozen_dtype=bf16 needs train.precision=bf16 (bf16 weights are only used inside bf16 autocast)')
        _need(isinstance(self.gradient_checkpointing, bool), 'train.gradient_checkpointing must be true or false')
        _need(self.device in ('auto', 'cpu'), f"train.device must be 'auto' or 'cpu', got {self.device!r}")
        _need(self.keep_checkpoints >= 0 and self.eval_decode_samples >= 0,
              'train.keep_checkpoints and train.eval_decode_samples must be >= 0')
        _need(self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps > 0),
              f'train.max_steps must be a positive int or null, got {self.max_steps!r}')
        _need(self.time_budget_s is None or self.time_budget_s > 0, 'train.time_budget_s must be > 0 or null')
        _need(isinstance(self.resume, str) and self.resume != '', "train.resume must be 'auto', 'never' or a path")
        self.lora.validate()


@dataclass
class TrainConfig:
    model: dict = field(default_factory=dict)  # BlockVLAConfig fields
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainOptions = field(default_factory=TrainOptions)

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = _build(DataConfig, self.data, 'data')
        if isinstance(self.train, dict):
            raw = dict(self.train)
            lora = raw.pop('lora', None) or {}
            _need(isinstance(lora, (dict, LoraConfig)),
                  f'train.lora must be a mapping of LoRA settings, got {lora!r:.60}')
            self.train = _build(TrainOptions, raw, 'train')
            self.train.lora = _build(LoraConfig, lora, 'train.lora') if isinstance(lora, dict) else lora
        _need(isinstance(self.model, dict), 'model must be a mapping of BlockVLAConfig fields')
        self.data.validate()
        self.train.validate()
        self.model_config()  # validates the model section now, not after the bags are read

    def model_config(self, **extra) -> BlockVLAConfig:
        """The policy config: `model:` plus the training mode (train_mode; decoder unless given), the seed and the
        control rate (data.rate_hz: the policy runs at the rate its training windows were aligned at)."""
        model = dict(self.model)
        mode = self.train.mode
        if 'train_mode' in model and model['train_mode'] != mode:
            raise ValueError(f'model.train_mode {model["train_mode"]!r} contradicts train.mode {mode!r}; '
                             'set only train.mode')
        model['train_mode'] = mode
        rate = model.get('control_rate_hz')
        if rate is not None and float(rate) != float(self.data.rate_hz):
            raise ValueError(f'model.control_rate_hz {rate} contradicts data.rate_hz {self.data.rate_hz}; set only '
                             'data.rate_hz (the rate the episodes are aligned at is the rate the policy runs at)')
        model['control_rate_hz'] = float(self.data.rate_hz)
        model.setdefault('decoder', mode)
        model.setdefault('seed', self.train.seed)
        model.update(extra)
        try:
            return BlockVLAConfig.from_dict(coerce_floats(BlockVLAConfig, model, 'model'))
        except (TypeError, ValueError) as e:
            raise ValueError(f'model section: {e}') from e

    def to_dict(self) -> dict:
        return {'model': dict(self.model), 'data': dataclasses.asdict(self.data),
                'train': dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, data: dict) -> 'TrainConfig':
        if not isinstance(data, dict):
            raise ValueError('a training config must be a mapping with model/data/train sections')
        unknown = sorted(set(data) - {'model', 'data', 'train'})
        if unknown:
            raise ValueError(f'unknown top-level config sections {unknown}; expected model, data, train')
        for name in ('model', 'data', 'train'):
            section = data.get(name)
            if section is not None and not isinstance(section, dict):
                raise ValueError(f'{name} must be a mapping of settings, got {section!r:.60}')
        return cls(model=dict(data.get('model') or {}), data=dict(data.get('data') or {}),
                   train=dict(data.get('train') or {}))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, overrides: dict) -> 'TrainConfig':
        """A copy with dotted overrides applied: {'train.lr': 3e-4, 'model.chunk_len': 8}."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return TrainConfig.from_dict(raw)


def load_train_config(path: str | os.PathLike, overrides: Optional[list] = None) -> TrainConfig:
    """Read a YAML config and apply `key.sub=value` overrides (values parsed as YAML: 3e-4, true, [a, b])."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'training config not found: {path}')
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f'{path}: cannot parse YAML ({e})') from e
    if not isinstance(raw, dict):
        raise ValueError(f'{path}: expected a mapping with model/data/train sections')
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    try:
        return TrainConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from e


def parse_override(item: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003)."""
    if '=' not in item:
        raise ValueError(f'override {item!r} must look like key.sub=value (e.g. train.lr=3e-4)')
    key, text = item.split('=', 1)
    key = key.strip()
    if not key or any(not part for part in key.split('.')):
        raise ValueError(f'override {item!r}: bad key {key!r}')
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f'override {item!r}: cannot parse the value ({e})') from e
    return key, value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split('.')
    if parts[0] not in ('model', 'data', 'train'):
        raise ValueError(f'override {key!r}: the first part must be model, data or train')
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f'override {key!r}: {part!r} is not a section')
        node = child
    node[parts[-1]] = value


def _build(cls, values: dict, section: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f'{section}: unknown keys {unknown}; known: {sorted(known)}')
    return cls(**coerce_floats(cls, values, section))


def coerce_floats(cls, values: dict, section: str) -> dict:
    """YAML reads `3e-4` (no dot) as a string: turn strings in float-typed fields into floats."""
    out = dict(values)
    for f in dataclasses.fields(cls):
        value = out.get(f.name)
        if isinstance(value, str) and 'float' in str(f.type):
            try:
                out[f.name] = float(value)
            except ValueError:
                raise ValueError(f'{section}.{f.name} must be a number, got {value!r}') from None
    return out


_TYPES = {'int': 'an integer', 'float': 'a finite number', 'bool': 'true or false', 'str': 'a non-empty string',
          'list': 'a list', 'dict': 'a mapping'}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_types(obj, section: str) -> None:
    """Each field holds a value of its annotated type (null only where Optional), named in the error: the range
    checks that follow, and the trainer, then never meet a string or a null."""
    for f in dataclasses.fields(obj):
        kind, value = str(f.type), getattr(obj, f.name)
        if kind.startswith('Optional['):
            if value is None:
                continue
            kind = kind[len('Optional['):-1]
        if kind not in _TYPES:
            continue
        ok = {'int': lambda v: isinstance(v, int) and not isinstance(v, bool), 'float': _is_number,
              'bool': lambda v: isinstance(v, bool), 'str': lambda v: isinstance(v, str) and v != '',
              'list': lambda v: isinstance(v, list), 'dict': lambda v: isinstance(v, dict)}[kind](value)
        _need(ok, f'{section}.{f.name} must be {_TYPES[kind]}, got {value!r:.60}')


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)
