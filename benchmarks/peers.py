"""Peer AR runtimes on a policy's own backbone, timed beside our block diffusion (used by decode_latency.py).

    peers = build_peers(policy, work, threads)           # the backbone as an HF folder -> both peers
    report = time_peers(peers, blockdiff_chunk, runs, warmup)
    report['blockdiff_vs_genai_ar_speedup'], report['blockdiff_vs_hf_generate_speedup']

- genai_ar: onnxruntime-genai (pinned in requirements.txt) with the ONNX model its own model builder makes from the
  backbone folder (fp32, CPU), greedy, `intra_op_num_threads` = threads.
- genai_ar_kept: the same keeping the instruction's K/V across chunks, as our node does by default: one generator
  holds the instruction tokens; each chunk `rewind_to`s them, appends the observation tokens and generates (only
  when `build_peers` is given the instruction length, `kept`).
- hf_generate: HF transformers `generate` (torch, greedy) on the very same tensors as the policy's backbone.
Both generate the chunk's number of action tokens (H*D) after a prompt as long as the policy's prefix, with the
EOS token disabled so every chunk has the same length. They compute logits over the backbone's whole vocabulary
(what an AR VLA does); our policy reads only the n_bins action logits. Runs are interleaved (run i of every variant,
then run i + 1), so load changes on a shared machine hit every variant alike. Each is timed by the wall clock and
by the calling thread's CPU time (`cpu_ms`, `cpu_ratios`): with one intra-op thread, ONNX Runtime, onnxruntime-genai
and torch all compute on the calling thread, and CPU time is steadier than wall time on a shared machine.
"""
from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

GENAI_PIN = 'onnxruntime-genai==0.18.0'


def causal_lm_on(policy):
    """An AutoModelForCausalLM whose base model IS policy.llm (no copy) and whose LM head is tied to its embeddings."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = policy.llm.config.__class__.from_dict(policy.llm.config.to_dict())
    cfg.tie_word_embeddings = True
    cfg.use_cache = True
    with torch.device('meta'):
        lm = AutoModelForCausalLM.from_config(cfg, attn_implementation='sdpa')
    setattr(lm, lm.base_model_prefix, policy.llm)
    lm.lm_head.weight = policy.llm.get_input_embeddings().weight
    lm.generation_config.eos_token_id = None  # a chunk always has the same number of tokens
    lm.generation_config.pad_token_id = 0
    return lm.eval()


def save_backbone_folder(lm, folder: Path) -> Path:
    """The causal LM as an HF folder (weights + config + a minimal tokenizer, which the genai builder requires)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    lm.save_pretrained(folder)
    vocab = {'<pad>': 0, '<s>': 1, '</s>': 2, '<unk>': 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', bos_token='<s>', eos_token='</s>',
                            unk_token='<unk>').save_pretrained(folder)
    return folder


class HFGenerate:
    name = 'hf_generate'

    def __init__(self, lm, prompt_len: int, new_tokens: int, seed: int = 0):
        import torch

        self.lm, self.new_tokens, self.torch = lm, new_tokens, torch
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, lm.config.vocab_size, (1, prompt_len), generator=gen)

    def __call__(self) -> int:
        with self.torch.inference_mode():
            out = self.lm.generate(input_ids=self.ids, attention_mask=self.torch.ones_like(self.ids),
                                   max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, do_sample=False)
        return out.shape[1] - self.ids.shape[1]


class GenaiAR:
    name = 'genai_ar'

    def __init__(self, model_dir: Path, prompt_len: int, new_tokens: int, vocab: int, seed: int = 0):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(model_dir))
        self.ids = np.random.default_rng(seed).integers(4, vocab, (1, prompt_len)).astype(np.int32)
        self.max_length = prompt_len + new_tokens

    def __call__(self) -> int:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, min_length=self.max_length, do_sample=False)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(self.ids)
        while not gen.is_done():
            gen.generate_next_token()
        return len(gen.get_sequence(0)) - self.ids.shape[1]  # new tokens


class GenaiARKept(GenaiAR):
    name = 'genai_ar_kept'

    def __init__(self, model_dir: Path, prompt_len: int, new_tokens: int, vocab: int, kept: int, seed: int = 0):
        super().__init__(model_dir, prompt_len, new_tokens, vocab, seed)
        self.kept, self.gen = int(kept), None

    def __call__(self) -> int:
        if self.gen is None:  # the first chunk computes the instruction's K/V (a warm-up run)
            params = self.og.GeneratorParams(self.model)
            params.set_search_options(max_length=self.max_length, min_length=self.max_length, do_sample=False)
            self.gen = self.og.Generator(self.model, params)
            self.gen.append_tokens(self.ids[:, :self.kept])
        else:
            self.gen.rewind_to(self.kept)  # drop the last chunk's observation and tokens, keep the instruction
        self.gen.append_tokens(self.ids[:, self.kept:])
        while not self.gen.is_done():
            self.gen.generate_next_token()
        return self.gen.token_count() - self.ids.shape[1]  # new tokens


def build_genai_model(hf_folder: Path, out: Path, threads: int) -> Path:
    """onnxruntime-genai's model builder on the HF folder (fp32, CPU), then its session threads set."""
    cmd = [sys.executable, '-m', 'onnxruntime_genai.models.builder', '-i', str(hf_folder), '-o', str(out), '-p',
           'fp32', '-e', 'cpu', '-c', str(out.parent / 'genai_cache')]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'onnxruntime-genai model builder failed: {proc.stdout[-1500:]}{proc.stderr[-1500:]}')
    config_path = out / 'genai_config.json'
    config = json.loads(config_path.read_text())
    options = config['model']['decoder'].setdefault('session_options', {})
    options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    config_path.write_text(json.dumps(config, indent=2))
    return out


def build_peers(policy, work: Path, threads: int, kept: int = 0) -> dict:
    """-> {'peers': {name: callable}, 'skipped': {name: why}, 'build_s': {name: s}, ...}; `kept` > 0 (the
    instruction's token count) adds genai_ar_kept."""
    cfg = policy.config
    prompt, new = cfg.prefix_len, cfg.n_action_tokens
    lm = causal_lm_on(policy)
    out = {'peers': {}, 'skipped': {}, 'build_s': {}, 'prompt_tokens': prompt, 'new_tokens': new}
    out['peers']['hf_generate'] = HFGenerate(lm, prompt, new)
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        out['skipped']['genai_ar'] = (f'onnxruntime-genai is not installed (requirements.txt pins {GENAI_PIN}; '
                                      '`make setup` installs it)')
        return out
    t = time.perf_counter()
    folder = save_backbone_folder(lm, Path(work) / 'peer_backbone_hf')
    model_dir = build_genai_model(folder, Path(work) / 'peer_genai', threads)
    out['peers']['genai_ar'] = GenaiAR(model_dir, prompt, new, lm.config.vocab_size)
    if kept:
        out['peers']['genai_ar_kept'] = GenaiARKept(model_dir, prompt, new, lm.config.vocab_size, kept)
    out['build_s']['genai_ar'] = time.perf_counter() - t
    return out


def time_peers(built: dict, blockdiff, runs: int, warmup: int, blockdiff_kept=None) -> dict:
    """Interleaved medians of `blockdiff` (a callable decoding one chunk), `blockdiff_kept` (the same with the
    instruction's K/V kept, optional) and each peer; -> report with the ratios."""
    ours = {'blockdiff': blockdiff, **({'blockdiff_kept': blockdiff_kept} if blockdiff_kept else {})}
    variants = {**ours, **built['peers']}
    times, cpu = {name: [] for name in variants}, {name: [] for name in variants}
    tokens = {}
    for i in range(warmup + runs):
        for name, fn in variants.items():
            t, c = time.perf_counter(), time.thread_time()
            n = fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - t) * 1e3)
                cpu[name].append((time.thread_time() - c) * 1e3)
            tokens[name] = n
    med = {name: statistics.median(ts) for name, ts in times.items()}
    cpu_med = {name: statistics.median(ts) for name, ts in cpu.items()}
    import onnxruntime

    try:
        import onnxruntime_genai as og
        genai_version = og.__version__
    except ImportError:
        genai_version = None
    report = {'median_ms': med, 'cpu_ms': cpu_med, 'cpu_ratios': {},
              'new_tokens': {k: v for k, v in tokens.items() if k not in ours},
              'prompt_tokens': built['prompt_tokens'], 'runs': runs, 'skipped': built['skipped'],
              'build_s': built['build_s'], 'versions': {'onnxruntime': onnxruntime.__version__,
                                                        'onnxruntime_genai': genai_version}}
    for name, key, mine in (('genai_ar', 'blockdiff_vs_genai_ar_speedup', 'blockdiff'),
                            ('hf_generate', 'blockdiff_vs_hf_generate_speedup', 'blockdiff'),
                            ('genai_ar_kept', 'blockdiff_vs_genai_ar_speedup_instruction_kept', 'blockdiff_kept')):
        both = name in med and mine in med
        report[key] = med[name] / med[mine] if both else None
        if both:  # the calling thread's CPU time: both peers and our engine run on it (1 intra-op thread)
            report['cpu_ratios'][key] = cpu_med[name] / cpu_med[mine]
    return report
