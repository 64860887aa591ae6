#!/usr/bin/env python3
"""Decode latency of the torch engine on a GPU: CUDA graphs vs eager, float32 vs bfloat16, every decoder.

    python benchmarks/gpu_latency.py --shape small --json out/gpu_latency_small.json [--runs 20]
    python benchmarks/gpu_latency.py --shape qwen2.5-0.5b --json out/gpu_latency_qwen2.5-0.5b.json --runs 10

The policy has decode_latency's "small" settings (prefix 300 = 44 text + 256 image tokens, H*D = 56 action tokens,
B = 8, 2 refine passes per block; full diffusion gets the same refine budget per token) on the named backbone:
`small` (decode_latency's own: hidden 512, 8 layers) or a real shape from benchmarks/shapes.py (random weights,
nothing downloaded); `tiny` is decode_latency's tiny policy, for smoke runs. Nothing is exported: the engines run
the torch modules (runtime.torch_static_engine). On cuda three engines are timed, interleaved in one loop
(decode_latency.bench_all), on identical observations: float32 with CUDA graphs, float32 eager (what the capture
buys) and bfloat16 with CUDA graphs (the deployment setting); on the CPU (a smoke run) float32 and bfloat16.
Reported: ms per chunk per decoder (blockdiff vs AR vs full diffusion, prefill included), ms per pass of n = 1, B,
2B, the bfloat16 token agreement with float32 (same GPU), GPU memory before and after the timed runs. Timings are
printed, never asserted.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_latency as dl  # noqa: E402  (a sibling script: CONFIGS, bench_all, per_pass, ratios)
from shapes import SHAPES, VLM_SHAPES  # noqa: E402

LM_SHAPES = sorted(set(dl.CONFIGS) | (set(SHAPES) - set(VLM_SHAPES)))


def policy_config(shape: str):
    """decode_latency's policy of that name, or its small policy on the shapes.py backbone `shape`."""
    from blockvla_ros.model.config import BlockVLAConfig

    if shape in dl.CONFIGS:
        kw = dict(dl.CONFIGS[shape])
    else:
        kw = dict(dl.CONFIGS['small'], backbone=dict(SHAPES[shape]))
    probe = BlockVLAConfig(**kw)
    kw['fulldiff_steps'] = probe.n_blocks * probe.steps_per_block
    return BlockVLAConfig(**kw)


def variants(device: str, gpu_variants: bool = False) -> dict:
    """{engine name: (dtype, cuda_graphs)} timed on `device` (`gpu_variants`: the cuda set on any device)."""
    if device.startswith('cuda') or gpu_variants:
        return {'fp32_graphs': ('float32', True), 'fp32_eager': ('float32', False), 'bf16_graphs': ('bfloat16', True)}
    return {'fp32': ('float32', False), 'bf16': ('bfloat16', False)}


def gpu_memory(torch, device: str) -> dict:
    if not device.startswith('cuda'):
        return {}
    torch.cuda.synchronize()
    return {'allocated_bytes': torch.cuda.memory_allocated(), 'reserved_bytes': torch.cuda.memory_reserved(),
            'max_allocated_bytes': torch.cuda.max_memory_allocated()}


def bf16_agreement(config, engines: dict, prefixes) -> dict:
    """Lock-step logits and free-run token agreement of bfloat16 against float32 (CUDA graphs where on)."""
    from blockvla_ros.export.parity import LockStep
    from blockvla_ros.runtime.decoding import Decoder

    fp32 = next(e for name, e in engines.items() if name.startswith('fp32'))
    bf16 = next(e for name, e in engines.items() if name.startswith('bf16'))
    lock, tokens, agreeing = LockStep(fp32, bf16), 0, 0
    for prefix in prefixes:
        for dec in ('blockdiff', 'ar', 'fulldiff'):
            Decoder(config, dec)(lock, prefix)
            a, b = Decoder(config, dec)(fp32, prefix).tokens, Decoder(config, dec)(bf16, prefix).tokens
            tokens += a.size
            agreeing += int((a == b).sum())
    return {'token_agreement': agreeing / max(tokens, 1), 'tokens': tokens,
            'max_abs_logit_diff': lock.max_abs_diff, 'lock_step_calls': lock.calls}


def build(args, torch):
    """Random policy + one engine per variant (each on its own copy of the weights) + observations."""
    from blockvla_ros.model.action_tokenizer import NormStats
    from blockvla_ros.model.policy import BlockVLAPolicy
    from blockvla_ros.runtime.runner import build_preprocessor
    from blockvla_ros.runtime.torch_static_engine import StaticTorchEngine

    torch.manual_seed(0)
    config = policy_config(args.shape)
    t = time.perf_counter()
    policy = BlockVLAPolicy(config).eval()
    params = sum(p.numel() for p in policy.parameters())
    print(f'policy {args.shape}: {params / 1e6:.1f} M params built in {time.perf_counter() - t:.1f} s; prefix '
          f'{config.prefix_len} tokens, H*D = {config.n_action_tokens}, B = {config.block_size}, '
          f'{config.steps_per_block} steps/block, full diffusion {config.fulldiff_steps} passes', flush=True)
    engines = {}
    for name, (dtype, graphs) in variants(args.device, args.gpu_variants).items():
        engines[name] = StaticTorchEngine(copy.deepcopy(policy), device=args.device, dtype=dtype, cuda_graphs=graphs)
    del policy
    stats = NormStats.from_data(np.random.default_rng(0).normal(size=(500, config.action_dim)))
    pre = build_preprocessor(config, stats)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (config.image_size, config.image_size, 3), dtype=np.uint8) for _ in range(8)]
    prefixes = [pre(img, dl.INSTRUCTIONS[i % 3]) for i, img in enumerate(images)]
    return config, params, engines, prefixes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--json', type=Path, required=True, help='write the results here')
    p.add_argument('--shape', choices=LM_SHAPES, default='small', help='backbone shape (see the module doc)')
    p.add_argument('--device', help='cuda (default when a GPU is visible), cuda:N or cpu (a smoke run)')
    p.add_argument('--runs', type=int, default=20, help='timed decodes per engine/decoder (medians)')
    p.add_argument('--warmup', type=int, default=2, help='untimed decodes first (the CUDA graphs are captured here)')
    p.add_argument('--agreement-observations', type=int, default=4, help='observations for the bf16 agreement')
    p.add_argument('--threads', type=int, default=min(4, os.cpu_count() or 1), help='CPU threads of torch')
    p.add_argument('--gpu-variants', action='store_true', help='time the cuda engine set (fp32 graphs, fp32 eager, '
                   'bf16 graphs) on any device: gpu_check.sh --dry-run-cpu runs that path on the CPU (no capture)')
    args = p.parse_args(argv)

    import torch

    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        print(f'--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu for a '
              'smoke run', file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config, params, engines, prefixes = build(args, torch)
    results = dl.bench_all(engines, config, prefixes, args.runs, args.warmup)  # the warm-up runs capture the graphs
    memory = {'after_warmup_and_runs': gpu_memory(torch, args.device)}
    again = dl.bench_all(engines, config, prefixes, 2, 0)  # two more chunks each: does anything still allocate?
    memory['after_2_more_chunks'] = gpu_memory(torch, args.device)
    del again
    passes = {name: dl.per_pass(e, config, prefixes[0], args.runs) for name, e in engines.items()}
    agreement = bf16_agreement(config, engines, prefixes[:args.agreement_observations])
    out = {
        'shape': args.shape, 'device': args.device, 'runs': args.runs, 'threads': args.threads,
        'gpu': torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith('cuda') else None,
        'torch': torch.__version__, 'cuda': torch.version.cuda, 'machine': platform.machine(),
        'policy': {'params_m': params / 1e6, 'prefix_len': config.prefix_len, 'action_tokens': config.n_action_tokens,
                   'block_size': config.block_size, 'steps_per_block': config.steps_per_block,
                   'schedule': config.schedule, 'fulldiff_steps': config.fulldiff_steps},
        'engines': {name: e.describe() for name, e in engines.items()},
        'results': {name: list(rows.values()) for name, rows in results.items()},
        'ratios': {name: dl.ratios(rows) for name, rows in results.items()},
        'per_pass': passes,
        'bf16_vs_fp32': agreement,
        'memory': memory,
    }
    names = list(engines)
    if 'fp32_eager' in results:
        out['cuda_graphs_speedup'] = {d: results['fp32_eager'][d]['median_ms'] / results['fp32_graphs'][d]['median_ms']
                                      for d in dl.DECODERS}
    out['bf16_speedup'] = {d: results[names[0]][d]['median_ms'] / results[names[-1]][d]['median_ms']
                           for d in dl.DECODERS}
    out['seconds'] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print_table(out, results)
    return 0


def print_table(out: dict, results: dict) -> None:
    print(f'\n{out["shape"]} on {out["gpu"] or out["device"]} (torch {out["torch"]}, CUDA {out["cuda"]}), '
          f'{out["runs"]} interleaved runs')
    print(f'{"engine":<12} {"decoder":<18} {"median ms":>10} {"p90 ms":>8} {"prefill ms":>11} {"NFE":>5} {"tok/s":>9}')
    for name, rows in results.items():
        for r in rows.values():
            print(f'{name:<12} {r["decoder"]:<18} {r["median_ms"]:10.2f} {r["p90_ms"]:8.2f} {r["prefill_ms"]:11.2f} '
                  f'{r["nfe"]:5d} {r["action_tokens_per_s"]:9.1f}')
    for name, ratio in out['ratios'].items():
        print(f'{name:<12} ' + '  '.join(f'{k} {v:.2f}x' for k, v in ratio.items()))
    for name, per in out['per_pass'].items():
        print(f'{name:<12} per pass: ' + '  '.join(f'{k} {v["median_ms"]:.2f} ms' for k, v in per.items()))
    for key in ('cuda_graphs_speedup', 'bf16_speedup'):
        if key in out:
            print(f'{key:<20} ' + '  '.join(f'{d} {v:.2f}x' for d, v in out[key].items()))
    a = out['bf16_vs_fp32']
    print(f'bf16 vs fp32: token agreement {a["token_agreement"]:.3f} over {a["tokens"]} tokens, lock-step max |logit '
          f'diff| {a["max_abs_logit_diff"]:.4f}')
    mem = out['memory']
    if mem['after_warmup_and_runs']:
        before, after = mem['after_warmup_and_runs'], mem['after_2_more_chunks']
        mib = 2 ** 20
        print(f'GPU memory: allocated {before["allocated_bytes"] / mib:.1f} MiB -> {after["allocated_bytes"] / mib:.1f}'
              f' MiB after 2 more chunks per variant (reserved {after["reserved_bytes"] / mib:.1f} MiB, peak '
              f'{after["max_allocated_bytes"] / 2**20:.1f} MiB)')
    print(f'total {out["seconds"]:.0f} s')


if __name__ == '__main__':
    sys.exit(main())
