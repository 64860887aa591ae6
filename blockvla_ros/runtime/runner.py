"""PolicyRunner: a verified policy folder + an engine + a decoder -> denormalized action chunks.

This is the API the ROS node and the offline evaluation use:

    runner = PolicyRunner.load('models/demo', engine='onnxruntime')
    runner.warmup()
    pred = runner.predict(rgb_uint8_hwc, 'pick up the red block', state=None, known_actions=None)
    pred.actions  # float32 [H, D] in physical units; pred.nfe, pred.timings['total_ms'], ...
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..model.action_tokenizer import ActionTokenizer
from ..model.text_tokenizer import load_text_tokenizer
from .decoding import Decoder
from .engine_factory import create_engine
from .policy_folder import PolicySpec, load_policy_folder
from .preprocess import Preprocessor

log = logging.getLogger(__name__)

DECODING_OVERRIDES = ('block_size', 'steps_per_block', 'schedule', 'threshold', 'fulldiff_steps')


@dataclass
class Prediction:
    actions: np.ndarray  # [H, D] float32, physical units (bin centres inside action_low/high)
    tokens: np.ndarray  # [H*D] int64
    nfe: int  # forward passes (prefill counted; folded into the first refine pass: one)
    calls: int  # graph calls actually made
    timings: dict  # preprocess_ms, prefill_ms (all prefill calls), decode_ms (the rest of the loop), total_ms
    steps: list = field(default_factory=list)  # refine passes per block
    instruction_kv_reused: bool = False  # the prefill reused the instruction's K/V (unchanged instruction)

    @property
    def tokens_per_nfe(self) -> float:
        return len(self.tokens) / max(self.nfe, 1)


class _PhaseTimer:
    """Wraps an engine for one decode: measures the time spent in prefill calls (the first refine pass folded into
    the prefill included)."""

    def __init__(self, engine):
        self.engine = engine
        self.prefill_s = 0.0

    def prefill(self, prefix):
        t = time.perf_counter()
        try:
            return self.engine.prefill(prefix)
        finally:
            self.prefill_s += time.perf_counter() - t

    def prefill_step(self, prefix, tokens, commit=0, block_size=1, rows=None):
        t = time.perf_counter()
        try:
            return self.engine.prefill_step(prefix, tokens, commit=commit, block_size=block_size, rows=rows)
        finally:
            self.prefill_s += time.perf_counter() - t

    def step(self, tokens, commit=0, block_size=1, rows=None):
        return self.engine.step(tokens, commit=commit, block_size=block_size, rows=rows)


def build_preprocessor(config, stats, folder=None, tokenizer_files=None) -> Preprocessor:
    """Image/text/state -> prefix. ``tokenizer_files``: explicit tokenizer file paths (a policy folder's listed
    files, read without transformers); ``folder``: a checkpoint or backbone folder (transformers' AutoTokenizer).
    A VLM policy's instruction slot: its tokenizer.json (among the files, else in the folder), tokenizers only."""
    if config.is_vlm and config.text_tokenizer == 'auto':
        from ..model.vlm.slot_tokenizer import slot_tokenizer

        text = slot_tokenizer(folder, config.max_text_tokens, config.vlm_layout, files=tokenizer_files)
        return Preprocessor(config, text, ActionTokenizer(stats, config.n_bins))
    vocab = int((config.backbone or {}).get('vocab_size', 1 << 20))
    text = load_text_tokenizer(config.text_tokenizer, config.max_text_tokens, vocab, folder, files=tokenizer_files)
    return Preprocessor(config, text, ActionTokenizer(stats, config.n_bins))


def policy_preprocessor(spec: PolicySpec) -> Preprocessor:
    """The preprocessor of a verified policy folder: its tokenizer reads only the files policy.yaml lists."""
    return build_preprocessor(spec.config, spec.stats, tokenizer_files=list(spec.tokenizer_paths.values()))


def apply_overrides(config, decoder: Optional[str], overrides: Optional[dict]):
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DECODING_OVERRIDES))
    if unknown:
        raise ValueError(f'unknown decoding overrides {unknown}; allowed: {list(DECODING_OVERRIDES)}')
    size = overrides.get('block_size', config.block_size)
    if size not in config.block_sizes:
        raise ValueError(f'block_size {size!r}: this policy was trained with block sizes {config.block_sizes} '
                         '(model.train_block_sizes) and decodes only with those')
    if decoder is not None:
        overrides['decoder'] = decoder
    return config.replace(**overrides) if overrides else config


class PolicyRunner:
    def __init__(self, spec: PolicySpec, engine, engine_name: str, decoder: Optional[str] = None,
                 overrides: Optional[dict] = None):
        self.spec = spec
        self.engine = engine
        self.engine_name = engine_name
        self.config = apply_overrides(spec.config, decoder, overrides)
        self.decoder = Decoder(self.config)
        self.preprocessor = policy_preprocessor(spec)
        self.action_tokenizer = self.preprocessor.actions
        self.action_names = list(spec.action_names)
        self.action_low = spec.action_low.copy()
        self.action_high = spec.action_high.copy()
        self.name = spec.name
        self.folder = spec.folder
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | os.PathLike, engine: str = 'onnxruntime', decoder: Optional[str] = None,
             overrides: Optional[dict] = None, require_gpu: bool = False, threads: Optional[int] = None,
             engine_options: Optional[dict] = None) -> 'PolicyRunner':
        """Verify the folder's manifest, build the engine, check the decoding overrides.

        engine: onnxruntime | onnxruntime-cuda | tensorrt | torch. decoder: blockdiff | ar | fulldiff |
        fulldiff_nocache (default: the policy's). overrides: block_size (one the policy was trained with),
        steps_per_block, schedule, threshold, fulldiff_steps.
        engine_options: see runtime.engine_factory.create_engine.
        """
        t = time.perf_counter()
        spec = load_policy_folder(Path(folder))
        apply_overrides(spec.config, decoder, overrides)  # validate before the (slow) engine build
        eng = create_engine(spec, engine, require_gpu=require_gpu, threads=threads, options=engine_options)
        runner = cls(spec, eng, engine, decoder, overrides)
        log.info('loaded policy %s from %s on %s in %.2f s: %s', spec.name, spec.folder, engine,
                 time.perf_counter() - t, runner.describe())
        return runner

    # ------------------------------------------------------------------------------------------------------
    def predict(self, image: np.ndarray, instruction: str, state=None, known_actions=None) -> Prediction:
        """RGB uint8 [H, W, 3] (any size; resized) + instruction (+ state) -> Prediction.

        known_actions [k, D]: actions already committed to the robot (real-time chunking); they are tokenized
        and kept as the first k timesteps of the chunk, which continues them.
        """
        with self._lock:
            t0 = time.perf_counter()
            prefix = self.preprocessor(image, instruction, state)
            known = self._known_tokens(known_actions)
            t1 = time.perf_counter()
            timer = _PhaseTimer(self.engine)
            res = self.decoder(timer, prefix, known=known)
            t2 = time.perf_counter()
            actions = self.action_tokenizer.decode(res.tokens)  # [H*D] -> [H, D]
            t3 = time.perf_counter()
        prefill_ms = timer.prefill_s * 1e3
        timings = {'preprocess_ms': (t1 - t0) * 1e3, 'prefill_ms': prefill_ms,
                   'decode_ms': (t2 - t1) * 1e3 - prefill_ms, 'total_ms': (t3 - t0) * 1e3}
        reused = bool(getattr(self.engine, 'text_kv_reused', False))
        return Prediction(actions=actions, tokens=res.tokens, nfe=res.nfe, calls=res.calls, timings=timings,
                          steps=list(res.steps), instruction_kv_reused=reused)

    def _known_tokens(self, known_actions) -> Optional[np.ndarray]:
        if known_actions is None:
            return None
        a = np.asarray(known_actions, dtype=np.float64)
        if a.size == 0:
            return None
        h, d = self.config.chunk_len, self.config.action_dim
        if a.ndim != 2 or a.shape[1] != d or a.shape[0] > h:
            raise ValueError(f'known_actions must have shape [k, {d}] with k <= {h} (chunk_len), got {a.shape}')
        return self.action_tokenizer.encode(a)  # [k, D] -> [k*D]

    def warmup(self, n: int = 2, image_shape=(480, 640)) -> None:
        """Run n predictions on a gray camera-sized image: the first calls allocate arenas, build kernels and load
        the resize code, which would otherwise stall the first real inference (and, through the GIL, the node's
        control tick)."""
        image = np.full((*image_shape, 3), 128, np.uint8)
        state = None
        if self.config.state_dim:
            state = (np.asarray(self.spec.stats.state_low) + np.asarray(self.spec.stats.state_high)) / 2
        for _ in range(n):
            self.predict(image, 'warm up', state)
        if hasattr(self.engine, 'forget_instruction'):
            self.engine.forget_instruction()

    def describe(self) -> dict:
        d = {'policy': self.name, 'folder': str(self.folder), 'decoder': self.config.decoder,
             'engine': self.engine_name, 'provider': None, 'device': 'cpu'}
        d.update(self.engine.describe())
        if d.get('provider') is None and self.engine_name == 'torch':
            d['provider'] = 'torch'
        return d
