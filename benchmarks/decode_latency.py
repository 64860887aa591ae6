#!/usr/bin/env python3
"""Decode latency of every decoder on torch and ONNX Runtime, same weights, ratios measured in one run.

    python benchmarks/decode_latency.py --json out/decode_latency.json [--runs 30] [--small-config small]
                                        [--device cuda --dtype bfloat16]   # the torch engine on a GPU
    python benchmarks/decode_latency.py --shape qwen2.5-0.5b --runs 3 --threads 1 --json out/decode_latency_0.5b.json

A random policy of the chosen size is saved as a checkpoint, exported with blockvla-export (parity-checked),
and then decoded with: block diffusion (ours; B = 8, 2 refine passes per block on the small shape), the same with
each commit as its own pass instead of fused into the next block's first refine pass (`blockdiff_unfused`), the
same with the prefill as its own pass instead of folded into the first refine pass (`blockdiff_unfolded`), AR
with KV cache, full diffusion with the prefix cached, and full diffusion with the prefix recomputed every pass
(the paper's baseline). Latency = median over --runs decodes of one action chunk (prefill included), on identical
observations for every engine/decoder; `cpu_ms` is the median CPU time of the decoding thread (steadier than wall
time on a shared machine). Per-pass figures: one backbone pass of n = 1 (AR), B (refine) and 2B (fused commit +
refine) tokens on ONNX Runtime. Also measured: the instruction K/V reuse (prefill with an unchanged vs a new
instruction) and the RSS after 100 and after 1,000 predictions through PolicyRunner. Peers (benchmarks/peers.py,
--no-peers skips them): onnxruntime-genai AR and HF `generate` on the policy's own backbone, interleaved with ONNX
Runtime block diffusion in the same run -> blockdiff_vs_genai_ar_speedup, blockdiff_vs_hf_generate_speedup. Every
figure above is cold: each chunk recomputes the whole prefix. The node keeps the instruction's K/V across chunks
by default; `instruction_kept` times that path beside them (ONNX Runtime blockdiff and AR, the same instruction every
chunk) and, with the peers, onnxruntime-genai AR keeping the instruction too (`rewind_to` to it every chunk).
`--shape NAME` (benchmarks/shapes.py) swaps the small backbone for a real one's dimensions with random weights
(written shard by shard, never downloaded) and keeps the small config's vision and decoding settings; the export's
parity check and the torch engine are skipped there (--parity-samples, --engines), and so are the decoders that
recompute the prefix (fulldiff_nocache) or exist to show the fused commit or the folded prefill (blockdiff_unfused,
blockdiff_unfolded) unless --decoders
names them. Timings are printed, never asserted.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    # hidden 512, 8 layers (~27 M params); prefix = 44 text + 256 image tokens = 300; H*D = 8*7 = 56; B = 8
    'small': dict(backbone={'model_type': 'qwen2', 'vocab_size': 1024, 'hidden_size': 512, 'intermediate_size': 1408,
                            'num_hidden_layers': 8, 'num_attention_heads': 8, 'num_key_value_heads': 4,
                            'max_position_embeddings': 1024},
                  vision={'type': 'patch', 'patch_size': 8, 'dim': 256}, image_size=128, max_text_tokens=44,
                  action_dim=7, chunk_len=8, block_size=8, steps_per_block=2, schedule='fixed'),
    'tiny': dict(backbone={'model_type': 'qwen2', 'vocab_size': 512, 'hidden_size': 64, 'intermediate_size': 128,
                           'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
                           'max_position_embeddings': 1024},
                 vision={'type': 'patch', 'patch_size': 16, 'dim': 32}, image_size=32, max_text_tokens=40,
                 action_dim=3, chunk_len=4, block_size=3, steps_per_block=3, schedule='fixed'),
}
DECODERS = ('blockdiff', 'blockdiff_unfused', 'blockdiff_unfolded', 'ar', 'fulldiff', 'fulldiff_nocache')
VARIANTS = {'blockdiff_unfused': ('blockdiff', {'fuse_commit': False}),  # decoder name -> (Decoder, its options)
            'blockdiff_unfolded': ('blockdiff', {'fold_prefill': False})}
SHAPE_DECODERS = ('blockdiff', 'ar', 'fulldiff')  # --shape default: a real-size backbone takes seconds per pass
INSTRUCTIONS = ('put the red block on the plate', 'open the top drawer', 'stack the green cup')


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc; psutil elsewhere)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def make_policy_folder(work: Path, size: str, fulldiff_steps: int | None, threads: int, shape: str | None = None,
                       parity_samples: int = 2, reuse: bool = False):
    """Random checkpoint of `size` (on the backbone dimensions of `shape`, if given) -> exported policy folder.
    With `reuse`, a checkpoint and folder that an earlier run left in `work` are used as they are (no export).
    -> (policy, folder, export report or None)."""
    from blockvla_ros.export.policy_writer import export_policy, load_checkpoint
    from blockvla_ros.model.action_tokenizer import NormStats
    from blockvla_ros.model.config import BlockVLAConfig
    from blockvla_ros.model.policy import BlockVLAPolicy

    kw = dict(CONFIGS[size])
    name = f'{size}_{shape}' if shape else size
    ckpt, folder = work / f'ckpt_{name}', work / 'models' / name
    if reuse and (folder / 'manifest.json').is_file() and (ckpt / 'config.json').is_file():
        return load_checkpoint(ckpt)[0], folder, None
    if shape:  # a real backbone's dimensions, random weights
        import shapes

        kw.pop('backbone')
        kw['backbone_path'] = str(shapes.write_random_backbone(shape, work / f'backbone_{shape}'))
    probe = BlockVLAConfig(**kw)
    # full diffusion gets the same refine budget per token as block diffusion (n_blocks * steps_per_block)
    kw['fulldiff_steps'] = fulldiff_steps or probe.n_blocks * probe.steps_per_block
    config = BlockVLAConfig(**kw)
    policy = BlockVLAPolicy(config).eval()
    policy.save(ckpt)
    rng = np.random.default_rng(0)
    NormStats.from_data(rng.normal(size=(500, config.action_dim))).save(ckpt / 'stats.json')
    report = export_policy(ckpt, folder, parity_samples=parity_samples, threads=threads, progress=True)
    return policy, folder, report


def clock(engine) -> float:
    """time.perf_counter() once the work `engine` queued on a device is done (`Engine.synchronize`: a GPU engine
    returns its logits before its last cache write has run). Every timer read of this module goes through it."""
    sync = getattr(engine, 'synchronize', None)
    if sync is not None:
        sync()
    return time.perf_counter()


class Timed:
    """Engine wrapper measuring the time spent in prefill calls."""

    def __init__(self, engine):
        self.engine, self.prefill_s = engine, 0.0

    def prefill(self, prefix):
        t = clock(self.engine)
        out = self.engine.prefill(prefix)
        self.prefill_s += clock(self.engine) - t
        return out

    def prefill_step(self, prefix, tokens, commit=0, block_size=1, rows=None):
        t = clock(self.engine)
        out = self.engine.prefill_step(prefix, tokens, commit=commit, block_size=block_size, rows=rows)
        self.prefill_s += clock(self.engine) - t
        return out

    def step(self, tokens, commit=0, block_size=1, rows=None):
        return self.engine.step(tokens, commit=commit, block_size=block_size, rows=rows)


def torch_engine(policy, device: str, dtype: str):
    """float32 on the CPU: the reference TorchEngine; otherwise the deployed torch engine (StaticTorchEngine; CUDA
    graphs on cuda) on a copy of the weights (it casts the module it is given)."""
    from blockvla_ros.runtime.torch_engine import TorchEngine
    from blockvla_ros.runtime.torch_static_engine import StaticTorchEngine

    if device == 'cpu' and dtype == 'float32':
        return TorchEngine(policy)
    return StaticTorchEngine(copy.deepcopy(policy), device=device, dtype=dtype)


def bench_all(engines: dict, config, prefixes, runs, warmup, decoder_names=DECODERS, only=None) -> dict:
    """Median latency per (engine, decoder); `only` {engine: decoders} limits an engine to some of them. Runs are
    interleaved (run i of every variant, then run i + 1), so load changes on the machine hit every variant alike and
    the ratios stay comparable."""
    from blockvla_ros.runtime.decoding import Decoder

    only = only or {}
    variants = [(e, d) for e in engines for d in decoder_names if d in only.get(e, decoder_names)]
    decoders = {d: Decoder(config, VARIANTS.get(d, (d, {}))[0], **VARIANTS.get(d, (d, {}))[1]) for d in decoder_names}
    times = {v: ([], [], []) for v in variants}
    last = {}
    for i in range(warmup + runs):
        for ename, dec in variants:
            timed = Timed(engines[ename])
            t, c = clock(engines[ename]), time.thread_time()
            res = decoders[dec](timed, prefixes[i % len(prefixes)])
            if i >= warmup:
                times[(ename, dec)][0].append((clock(engines[ename]) - t) * 1e3)
                times[(ename, dec)][1].append(timed.prefill_s * 1e3)
                times[(ename, dec)][2].append((time.thread_time() - c) * 1e3)
            last[(ename, dec)] = res
        if i >= warmup:
            print(f'  run {i - warmup + 1}/{runs}: ' + '  '.join(
                f'{e}/{d} {times[(e, d)][0][-1]:.0f}' for e, d in variants), flush=True)
    results = {e: {} for e in engines}
    for (ename, dec), (total, prefill, cpu) in times.items():
        res, med = last[(ename, dec)], statistics.median(total)
        results[ename][dec] = {
            'decoder': dec, 'median_ms': med, 'cpu_ms': statistics.median(cpu),
            'p10_ms': float(np.percentile(total, 10)),
            'p90_ms': float(np.percentile(total, 90)), 'prefill_ms': statistics.median(prefill), 'nfe': res.nfe,
            'calls': res.calls, 'tokens_per_nfe': res.tokens_per_nfe,
            'action_tokens_per_s': config.n_action_tokens / (med / 1e3), 'runs': runs}
    return results


def per_pass(engine, config, prefix, runs: int) -> dict:
    """Median wall / CPU ms of one backbone pass of n = 1, B and 2B tokens after a prefill, interleaved."""
    B = config.block_size
    engine.prefill(prefix)
    shapes = {'n=1 (AR)': 1, f'n={B} (refine)': B, f'n={2 * B} (fused commit + refine)': 2 * B}
    times = {k: ([], []) for k in shapes}
    for i in range(runs + 2):
        for name, n in shapes.items():
            t, c = clock(engine), time.thread_time()
            engine.step(np.full(n, config.mask_token_id), commit=0)
            if i >= 2:
                times[name][0].append((clock(engine) - t) * 1e3)
                times[name][1].append((time.thread_time() - c) * 1e3)
    return {k: {'median_ms': statistics.median(w), 'cpu_ms': statistics.median(c)} for k, (w, c) in times.items()}


KEPT = 'onnxruntime_instruction_kept'  # bench_all's name for the ONNX Runtime engine that keeps the instruction K/V
RATIOS = {'blockdiff_vs_fulldiff_speedup': 'fulldiff_nocache', 'blockdiff_vs_fulldiff_cached_speedup': 'fulldiff',
          'blockdiff_vs_ar_speedup': 'ar', 'fused_commit_speedup': 'blockdiff_unfused',
          'folded_prefill_speedup': 'blockdiff_unfolded'}


def ratios(rows: dict, key: str = 'median_ms') -> dict:
    """Wall (median_ms) or CPU-time (cpu_ms) ratios against blockdiff, for the decoders that were timed."""
    b = rows['blockdiff'][key]
    return {name: rows[dec][key] / b for name, dec in RATIOS.items() if dec in rows}


def instruction_reuse(folder, threads, prefixes_same, prefixes_new, runs):
    """ORT prefill with the instruction K/V reused (unchanged instruction) vs recomputed (it changes every call)."""
    from blockvla_ros.runtime.ort_engine import OrtEngine
    from blockvla_ros.runtime.policy_folder import load_policy_folder

    engine = OrtEngine(load_policy_folder(folder), threads=threads, reuse_text_kv=True)
    if not engine.reuse_instruction:
        return {'implemented': False, 'reason': 'the prefix does not start with the instruction (image first)'}
    out = {'implemented': True}
    for name, prefixes in (('prefill_ms_reused', prefixes_same), ('prefill_ms_new_instruction', prefixes_new)):
        engine.prefill(prefixes[0])
        times = []
        for i in range(runs):
            t = time.perf_counter()
            engine.prefill(prefixes[(i + 1) % len(prefixes)])
            times.append((time.perf_counter() - t) * 1e3)
            assert engine.text_kv_reused == (name == 'prefill_ms_reused')
        out[name] = statistics.median(times)
    out['saving_ms'] = out['prefill_ms_new_instruction'] - out['prefill_ms_reused']
    out['speedup'] = out['prefill_ms_new_instruction'] / out['prefill_ms_reused']
    return out


def peer_latency(policy, ort_engine, config, prefixes, work: Path, args, kept_engine=None) -> dict:
    """onnxruntime-genai AR and HF generate on the policy's backbone, interleaved with ORT blockdiff chunks; with
    `kept_engine` (instruction K/V kept) also that engine's blockdiff against genai AR keeping the instruction."""
    from peers import build_peers, time_peers

    from blockvla_ros.runtime.decoding import Decoder

    decoder, count, count_kept = Decoder(config, 'blockdiff'), iter(range(1 << 30)), iter(range(1 << 30))
    print('peers: onnxruntime-genai model builder + HF generate on the same backbone ...', flush=True)
    built = build_peers(policy, work, args.threads, kept=kept_engine.split if kept_engine else 0)
    kept = kept_engine and (lambda: decoder(kept_engine, prefixes[next(count_kept) % len(prefixes)]).nfe)
    return time_peers(built, lambda: decoder(ort_engine, prefixes[next(count) % len(prefixes)]).nfe, args.runs,
                      args.warmup, blockdiff_kept=kept)


def memory_check(folder, threads, predictions, seed=0):
    from blockvla_ros.runtime.runner import PolicyRunner

    runner = PolicyRunner.load(folder, threads=threads)
    s = runner.config.image_size
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (s + 16, s + 8, 3), dtype=np.uint8) for _ in range(8)]
    marks, prev = {}, None
    for i in range(1, predictions + 1):
        known = prev.actions[:1] if prev is not None and i % 3 == 0 else None
        prev = runner.predict(images[i % 8], INSTRUCTIONS[(i // 10) % 3], known_actions=known)
        if i in (100, predictions):
            marks[i] = rss_mb()
    after_100, after_n = marks.get(100, float('nan')), marks[predictions]
    growth = (after_n - after_100) / after_100 * 100
    return {'predictions': predictions, 'rss_mb_after_100': after_100, f'rss_mb_after_{predictions}': after_n,
            'growth_pct': growth, 'within_5pct': bool(abs(growth) <= 5.0)}


def memory_check_subprocess(folder, threads, predictions) -> dict:
    """Run memory_check in a fresh interpreter (only the ONNX Runtime runner loaded; no torch, no other engines)."""
    code = ('import json, sys; sys.path.insert(0, sys.argv[1]); import decode_latency as b; '
            'print(json.dumps(b.memory_check(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))')
    proc = subprocess.run([sys.executable, '-c', code, str(Path(__file__).resolve().parent), str(folder),
                           str(threads), str(predictions)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f'memory check failed: {proc.stderr[-2000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--json', type=Path, required=True, help='write the results here')
    p.add_argument('--runs', type=int, default=30, help='timed decodes per engine/decoder (medians)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--small-config', choices=sorted(CONFIGS), default='small', help='policy size to time')
    p.add_argument('--threads', type=int, default=min(2, os.cpu_count() or 1),
                   help='CPU threads for torch and ONNX Runtime (use 1 on a machine shared with other jobs)')
    p.add_argument('--fulldiff-steps', type=int, help='refine passes of full diffusion (default n_blocks*steps)')
    p.add_argument('--memory-predictions', type=int, default=1000, help='predictions for the RSS check (0: skip)')
    p.add_argument('--memory-config', choices=sorted(CONFIGS), default='tiny',
                   help='policy size for the RSS check (the same runtime code paths; tiny keeps it minutes)')
    p.add_argument('--work', type=Path, help='keep the checkpoints and policy folders here (default: temp dir)')
    p.add_argument('--no-peers', dest='peers', action='store_false',
                   help='skip the onnxruntime-genai AR and HF generate peers (benchmarks/peers.py)')
    p.add_argument('--device', default='cpu', help="the torch engine's device: cpu | cuda | cuda:N (CUDA graphs)")
    p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16', 'float16'),
                   help="the torch engine's weights and cache (bfloat16 / float16 on GPUs)")
    p.add_argument('--shape', help='a real backbone shape from benchmarks/shapes.py (random weights), e.g. '
                   'qwen2.5-0.5b; the vision and decoding settings stay those of --small-config')
    p.add_argument('--engines', help='comma-separated: torch,onnxruntime (default both; onnxruntime with --shape)')
    p.add_argument('--decoders', help=f'comma-separated subset of {",".join(DECODERS)} (default all; with --shape '
                   f'{",".join(SHAPE_DECODERS)})')
    p.add_argument('--parity-samples', type=int, help='export parity observations (default 2; 0 with --shape)')
    p.add_argument('--reuse-work', action='store_true', help='use the checkpoint and policy folder an earlier run '
                   'left in --work (same settings) instead of exporting again')
    args = p.parse_args(argv)
    engine_names = (args.engines or ('onnxruntime' if args.shape else 'torch,onnxruntime')).split(',')
    decoder_names = tuple(args.decoders.split(',')) if args.decoders else SHAPE_DECODERS if args.shape else DECODERS
    if 'onnxruntime' not in engine_names or 'blockdiff' not in decoder_names or set(decoder_names) - set(DECODERS):
        p.error(f'--engines must include onnxruntime and --decoders blockdiff (decoders: {DECODERS})')
    if args.parity_samples is None:
        args.parity_samples = 0 if args.shape else 2

    import torch

    from blockvla_ros.runtime.ort_engine import OrtEngine
    from blockvla_ros.runtime.policy_folder import load_policy_folder
    from blockvla_ros.runtime.runner import build_preprocessor

    torch.set_num_threads(args.threads)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix='blockvla_bench_')
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    policy, folder, export = make_policy_folder(work, args.small_config, args.fulldiff_steps, args.threads, args.shape,
                                                args.parity_samples, reuse=args.reuse_work and args.work is not None)
    spec = load_policy_folder(folder)
    config = spec.config
    pre = build_preprocessor(config, spec.stats, folder)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (config.image_size, config.image_size, 3), dtype=np.uint8) for _ in range(8)]
    prefixes = [pre(img, INSTRUCTIONS[0]) for img in images]
    prefixes_new = [pre(img, INSTRUCTIONS[i % 3]) for i, img in enumerate(images)]
    backbone = f' on {args.shape}' if args.shape else ''
    print(f'policy: {args.small_config}{backbone} ({sum(x.numel() for x in policy.parameters()) / 1e6:.1f} M params), '
          f'prefix {config.prefix_len} tokens, H*D = {config.n_action_tokens}, B = {config.block_size}, '
          f'{config.steps_per_block} steps/block, full diffusion {config.fulldiff_steps} passes; '
          f'{args.threads} threads, {args.runs} runs', flush=True)

    engines = {'torch': lambda: torch_engine(policy, args.device, args.dtype),  # every call pays the prefill
               'onnxruntime': lambda: OrtEngine(spec, threads=args.threads, reuse_text_kv=False)}
    engines = {name: engines[name]() for name in engine_names}
    kept = OrtEngine(spec, threads=args.threads, reuse_text_kv=True)  # the node's default: instruction K/V kept
    if kept.reuse_instruction:  # timed beside the cold figures (same instruction every chunk), never instead of them
        engines[KEPT] = kept
    results = bench_all(engines, config, prefixes, args.runs, args.warmup, decoder_names,
                        only={KEPT: ('blockdiff', 'ar')})
    torch_desc = engines['torch'].describe() if 'torch' in engines else None
    passes = per_pass(engines['onnxruntime'], config, prefixes[0], args.runs)
    reuse = instruction_reuse(folder, args.threads, prefixes, prefixes_new, args.runs) if not args.shape else {
        'implemented': None, 'reason': 'not measured with --shape'}
    peers = peer_latency(policy, engines['onnxruntime'], config, prefixes, work, args,
                         engines.get(KEPT)) if args.peers else None
    del engines

    memory = None
    if args.memory_predictions:
        mem_folder = folder
        if args.memory_config != args.small_config:
            _, mem_folder, _ = make_policy_folder(work, args.memory_config, None, args.threads)
        print(f'memory: {args.memory_predictions} predictions through PolicyRunner ({args.memory_config}), in a '
              'fresh process so its RSS is the runner alone...', flush=True)
        memory = memory_check_subprocess(mem_folder, args.threads, args.memory_predictions)
        memory['config'] = args.memory_config

    ort = results['onnxruntime']
    tch = ratios(results['torch']) if 'torch' in results else {}
    kept_rows = results.pop(KEPT, None)
    out = {
        'config': args.small_config, 'shape': args.shape, 'threads': args.threads, 'runs': args.runs,
        'machine': platform.machine(),
        'processor': platform.processor() or platform.machine(), 'cpu_count': os.cpu_count(),
        'policy': {'params_m': sum(x.numel() for x in policy.parameters()) / 1e6, 'prefix_len': config.prefix_len,
                   'action_tokens': config.n_action_tokens, 'block_size': config.block_size,
                   'steps_per_block': config.steps_per_block, 'schedule': config.schedule,
                   'fulldiff_steps': config.fulldiff_steps},
        'torch_engine': torch_desc,  # device, dtype, CUDA graphs (captured shapes)
        'results': {e: list(rows.values()) for e, rows in results.items()},
        **ratios(ort),  # headline ratios: ONNX Runtime (the deployed engine), wall time
        'cpu_ratios': ratios(ort, 'cpu_ms'),  # the same from the decoding thread's CPU time (steadier when shared)
        'ort_vs_torch_speedup': tch and results['torch']['blockdiff']['median_ms'] / ort['blockdiff']['median_ms'],
        'ort_vs_torch_speedup_per_decoder': tch and {d: results['torch'][d]['median_ms'] / ort[d]['median_ms']
                                                     for d in decoder_names},
        'torch_ratios': tch,
        **{f'nfe_{d}': ort[d]['nfe'] for d in decoder_names},
        'tokens_per_nfe': {d: ort[d]['tokens_per_nfe'] for d in decoder_names},
        'per_pass_onnxruntime': passes,
        'instruction_kv_reuse': reuse,
        'peers': peers,  # interleaved with ONNX Runtime blockdiff in their own loop (benchmarks/peers.py)
        'blockdiff_vs_genai_ar_speedup': peers and peers['blockdiff_vs_genai_ar_speedup'],
        'blockdiff_vs_hf_generate_speedup': peers and peers['blockdiff_vs_hf_generate_speedup'],
        'peer_cpu_ratios': peers and peers['cpu_ratios'],
        'instruction_kept': kept_rows and {  # ONNX Runtime with the instruction's K/V kept across chunks (the node)
            'results': list(kept_rows.values()), **ratios(kept_rows), 'cpu_ratios': ratios(kept_rows, 'cpu_ms'),
            'blockdiff_vs_genai_ar_speedup': peers and peers.get('blockdiff_vs_genai_ar_speedup_instruction_kept'),
            'blockdiff_vs_genai_ar_cpu_ratio': peers and peers['cpu_ratios'].get(
                'blockdiff_vs_genai_ar_speedup_instruction_kept')},
        'memory': memory,
        'export_parity': export and export.parity,  # None: a reused folder (--reuse-work)
        'seconds': time.perf_counter() - started,
    }
    out['targets'] = targets(out, memory)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print_table(out, results)
    if tmp is not None:
        tmp.cleanup()
    return 0


def targets(out: dict, memory) -> dict:
    """Each target -> met (True / False), or None where this run did not measure it."""
    def at_least(key, level):
        return None if not out.get(key) else out[key] >= level

    genai = 3.0 if out['shape'] == 'qwen2.5-0.5b' else 1.5  # issue 16's targets
    return {'blockdiff_vs_fulldiff_speedup >= 3.3 (paper)': at_least('blockdiff_vs_fulldiff_speedup', 3.3),
            'blockdiff_vs_ar_speedup >= 2 (issue 16)': at_least('blockdiff_vs_ar_speedup', 2.0),
            f'blockdiff_vs_genai_ar_speedup >= {genai:g} (issue 16)': at_least('blockdiff_vs_genai_ar_speedup', genai),
            'ONNX Runtime faster than torch': None if not out['ort_vs_torch_speedup'] else
            out['ort_vs_torch_speedup'] > 1.0,
            'RSS after 1000 within 5 % of after 100': None if memory is None else memory['within_5pct']}


def print_table(out: dict, results: dict) -> None:
    print()
    print(f'{"engine":<12} {"decoder":<18} {"median ms":>10} {"CPU ms":>8} {"p90 ms":>9} {"prefill ms":>11} '
          f'{"NFE":>5} {"tok/NFE":>8} {"tok/s":>8}')
    for ename, rows in results.items():
        for r in rows.values():
            print(f'{ename:<12} {r["decoder"]:<18} {r["median_ms"]:10.1f} {r["cpu_ms"]:8.1f} {r["p90_ms"]:9.1f} '
                  f'{r["prefill_ms"]:11.1f} {r["nfe"]:5d} {r["tokens_per_nfe"]:8.2f} {r["action_tokens_per_s"]:8.1f}')
    print()
    for name, r in out['per_pass_onnxruntime'].items():
        print(f'ONNX Runtime pass {name:<34} {r["median_ms"]:7.2f} ms  (CPU {r["cpu_ms"]:.2f} ms)')
    for k in ('blockdiff_vs_fulldiff_speedup', 'blockdiff_vs_fulldiff_cached_speedup', 'blockdiff_vs_ar_speedup',
              'fused_commit_speedup', 'folded_prefill_speedup', 'ort_vs_torch_speedup'):
        if out.get(k):
            extra = [f'CPU time {out["cpu_ratios"][k]:.2f}x'] if k in out['cpu_ratios'] else []
            extra += [f'torch {out["torch_ratios"][k]:.2f}x'] if k in out['torch_ratios'] else []
            print(f'{k:<40} {out[k]:6.2f}x   ' + (f'({", ".join(extra)})' if extra else ''))
    peers = out['peers']
    if peers:
        med = peers['median_ms']
        print(f'peers ({peers["prompt_tokens"]} prompt tokens, {config_tokens(peers)} new, interleaved): ORT blockdiff '
              f'{med["blockdiff"]:.1f} ms, ' + ', '.join(f'{k} {v:.1f} ms' for k, v in med.items() if k != 'blockdiff'))
        for key in ('blockdiff_vs_genai_ar_speedup', 'blockdiff_vs_hf_generate_speedup'):
            cpu = peers['cpu_ratios'].get(key)
            print(f'{key:<40} ' + (f'{out[key]:6.2f}x   (CPU time {cpu:.2f}x)' if out[key] else 'skipped'))
        for name, why in peers['skipped'].items():
            print(f'peer {name} skipped: {why}')
    kept = out['instruction_kept']
    if kept:  # the node's default path, beside the cold figures above
        rows = {r['decoder']: r for r in kept['results']}
        print('instruction K/V kept across chunks (the node\'s default; cold figures above): ' + ', '.join(
            f'{d} {r["median_ms"]:.1f} ms (CPU {r["cpu_ms"]:.1f})' for d, r in rows.items()))
        if 'blockdiff_vs_ar_speedup' in kept:
            print(f'{"blockdiff_vs_ar_speedup (kept)":<40} {kept["blockdiff_vs_ar_speedup"]:6.2f}x   '
                  f'(CPU time {kept["cpu_ratios"]["blockdiff_vs_ar_speedup"]:.2f}x)')
        if kept['blockdiff_vs_genai_ar_speedup']:
            print(f'{"blockdiff_vs_genai_ar_speedup (kept)":<40} {kept["blockdiff_vs_genai_ar_speedup"]:6.2f}x   '
                  f'(CPU time {kept["blockdiff_vs_genai_ar_cpu_ratio"]:.2f}x; genai keeps it with rewind_to)')
    reuse = out['instruction_kv_reuse']
    if reuse.get('implemented'):
        print(f'instruction K/V reuse (ORT prefill): {reuse["prefill_ms_new_instruction"]:.1f} ms new instruction -> '
              f'{reuse["prefill_ms_reused"]:.1f} ms unchanged ({reuse["speedup"]:.2f}x)')
    else:
        print(f'instruction K/V reuse: {"not measured" if reuse.get("implemented") is None else "not implemented"} '
              f'({reuse.get("reason")})')
    mem = out['memory']
    if mem:
        n = mem['predictions']
        print(f'RSS ({mem["config"]}): after 100 predictions {mem["rss_mb_after_100"]:.1f} MB, after {n} '
              f'{mem[f"rss_mb_after_{n}"]:.1f} MB ({mem["growth_pct"]:+.2f} %)')
    for k, v in out['targets'].items():
        print(f'target: {k:<45} {"met" if v else ("n/a" if v is None else "NOT met")}')
    print(f'total {out["seconds"]:.0f} s')


def config_tokens(peers: dict) -> str:
    return '/'.join(str(n) for n in sorted(set(peers['new_tokens'].values()))) or '?'


if __name__ == '__main__':
    sys.exit(main())
