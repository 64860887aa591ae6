#!/usr/bin/env python3
"""CPU cost of every kind of backbone pass and of whole chunks, for several policy folders, interleaved in one run.

    python benchmarks/pass_cost.py FOLDER_A FOLDER_B [...] --runs 20 --threads 1 [--json OUT]

Measures one runtime change: export the same checkpoint before and after it (or as two graph variants) and pass
both folders; a change inside the engine: pass one folder twice, once as FOLDER:VARIANT (`plain-rotary`: the engine
opens the backbone without its rotary embeddings fused, `OrtEngine(fuse_rotary=False)`; `plain-attention`: without
its attention fused into GroupQueryAttention, `fuse_attention=False`; `plain`: as exported). Each folder is
opened with the ONNX Runtime engine (CPU); run i of every (folder, measurement) comes before run i + 1 of any, so
load changes on a shared machine hit every folder alike. The figure is the median CPU time of the decoding thread
(`time.thread_time`, steadier than wall time when other jobs share the cores); wall medians are reported beside it.
Measurements (same observations for every folder):

    prefill             one-call prefill (vision + the whole prefix in one backbone pass)
    prefill_reused      the prefill with the instruction's K/V reused (vision + the observation pass only)
    n=1, n=B, n=2B      one backbone pass after a prefill: AR, refine, fused commit + refine
    prefill+B           the one-call prefill with block 0's B masks folded in (one pass of P + B tokens)
    blockdiff, ar       one whole chunk with the policy's decoding settings (one-call prefill included; blockdiff's
                        first refine pass folded into it)
    blockdiff_unfolded  the same chunk with the prefill as its own pass (`Decoder(fold_prefill=False)`)
    blockdiff_all_rows  the same chunk asking every pass for the logits of all block tokens, not only the masked
                        ones (`Decoder(masked_rows=False)`: the decoder before that change, same tokens)

Measured in one process, the engine built first ran 5-15 % slower per pass than those built after it on this machine
(three folders in two orders: whichever came first), so a single run can favour the later folders. `--rotate` runs
the whole measurement once per rotation of the folder order, each in a fresh process, and reports the mean of the
medians and each folder's ratio to the first one (geometric mean over the rotations): use it for any A/B of a few
percent.

Timings are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

INSTRUCTION = 'put the red block on the plate'
VARIANTS = {'': {}, 'plain-rotary': dict(fuse_rotary=False), 'plain-attention': dict(fuse_attention=False),
            'plain': dict(fuse_rotary=False, fuse_attention=False)}  # FOLDER:VARIANT -> OrtEngine options


def measurements(engines: dict, config, prefixes: list) -> dict:
    """{name: callable(i)} for one folder's engines ('fresh': one-call prefill, 'reuse': instruction K/V kept)."""
    from blockvla_ros.runtime.decoding import Decoder

    fresh, reuse = engines['fresh'], engines['reuse']
    B, mask = config.block_size, config.mask_token_id

    def step(n):
        def run(i):
            fresh.prefill(prefixes[i % len(prefixes)])  # not timed: see `timed`
            return lambda: fresh.step(np.full(n, mask), commit=0)
        return run

    def folded(i):  # the prefill with block 0's masks in its pass, reading the rows the decoder reads
        return lambda: fresh.prefill_step(prefixes[i % len(prefixes)], np.full(B, mask), rows=slice(0, B - 1))

    out = {'prefill': lambda i: (lambda: fresh.prefill(prefixes[i % len(prefixes)])),
           'prefill_reused': lambda i: (lambda: reuse.prefill(prefixes[i % len(prefixes)])),
           'n=1': step(1), f'n={B}': step(B), f'n={2 * B}': step(2 * B), f'prefill+{B}': folded}
    for name, decoder in (('blockdiff', Decoder(config, 'blockdiff')), ('ar', Decoder(config, 'ar')),
                          ('blockdiff_unfolded', Decoder(config, 'blockdiff', fold_prefill=False)),
                          ('blockdiff_all_rows', Decoder(config, 'blockdiff', masked_rows=False))):
        out[name] = (lambda d: lambda i: (lambda: d(fresh, prefixes[i % len(prefixes)])))(decoder)
    return out


def timed(prepare, i: int) -> tuple:
    """prepare(i) sets up (untimed) and returns the call to time. -> (wall ms, CPU ms of this thread)."""
    call = prepare(i)
    t, c = time.perf_counter(), time.thread_time()
    call()
    return (time.perf_counter() - t) * 1e3, (time.thread_time() - c) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folders', nargs='+', help='policy folders of the same policy (e.g. two exports), each as FOLDER or '
                   'FOLDER:VARIANT (' + ', '.join(v for v in VARIANTS if v) + ')')
    p.add_argument('--runs', type=int, default=20)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=1, help='ONNX Runtime intra-op threads')
    p.add_argument('--json', type=Path, help='write the medians here')
    p.add_argument('--rotate', action='store_true', help='one fresh process per rotation of the folder order')
    args = p.parse_args(argv)
    if args.rotate:
        return rotated(args)

    from blockvla_ros.runtime.ort_engine import OrtEngine
    from blockvla_ros.runtime.policy_folder import load_policy_folder
    from blockvla_ros.runtime.runner import build_preprocessor

    plans, configs = {}, {}
    for entry in args.folders:
        folder, _, variant = entry.partition(':')
        folder = Path(folder)
        if variant not in VARIANTS:
            p.error(f'{entry}: the variants are ' + ', '.join(f'FOLDER:{v}' for v in VARIANTS if v))
        options = dict(threads=args.threads, **VARIANTS[variant])
        spec = load_policy_folder(folder)
        pre = build_preprocessor(spec.config, spec.stats, folder)
        rng = np.random.default_rng(1)
        s = spec.config.image_size
        prefixes = [pre(rng.integers(0, 256, (s, s, 3), dtype=np.uint8), INSTRUCTION) for _ in range(4)]
        engines = {'fresh': OrtEngine(spec, reuse_text_kv=False, **options),
                   'reuse': OrtEngine(spec, reuse_text_kv=True, **options)}
        engines['reuse'].prefill(prefixes[0])
        plans[entry] = measurements(engines, spec.config, prefixes)
        configs[entry] = engines['fresh'].describe()
    times = {(f, m): ([], []) for f, plan in plans.items() for m in plan}
    for i in range(args.warmup + args.runs):
        for (f, m), (wall, cpu) in times.items():
            w, c = timed(plans[f][m], i)
            if i >= args.warmup:
                wall.append(w)
                cpu.append(c)
        if i >= args.warmup:
            print(f'run {i - args.warmup + 1}/{args.runs}', flush=True)
    result = {f: {m: {'cpu_ms': statistics.median(times[(f, m)][1]), 'wall_ms': statistics.median(times[(f, m)][0])}
                  for m in plan} for f, plan in plans.items()}
    names = list(next(iter(plans.values())))
    print(f'\nmedian CPU ms (wall ms) over {args.runs} interleaved runs, {args.threads} thread(s)')
    print(f'{"":<16}' + ''.join(f'{Path(f).name[-28:]:>30}' for f in result))
    for m in names:
        print(f'{m:<16}' + ''.join(f'{r[m]["cpu_ms"]:>18.2f} ({r[m]["wall_ms"]:7.1f})' for r in result.values()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({'runs': args.runs, 'threads': args.threads, 'engines': configs,
                                         'results': result}, indent=2))
    return 0


def rotated(args) -> int:
    """Runs this script once per rotation of args.folders (fresh processes), then combines: mean CPU ms per
    (folder, measurement) and the geometric-mean ratio of each folder to the first."""
    import math
    import subprocess
    import tempfile

    folders = [str(f) for f in args.folders]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(len(folders)):
            order, out = folders[r:] + folders[:r], Path(tmp) / f'{r}.json'
            cmd = [sys.executable, __file__, *order, '--runs', str(args.runs), '--warmup', str(args.warmup),
                   '--threads', str(args.threads), '--json', str(out)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads(out.read_text())['results'])
            print(f'rotation {r + 1}/{len(folders)} done', flush=True)
    names = list(runs[0][folders[0]])
    result = {f: {m: {'cpu_ms': statistics.mean(r[f][m]['cpu_ms'] for r in runs),
                      'vs_first': math.exp(statistics.mean(math.log(r[f][m]['cpu_ms'] / r[folders[0]][m]['cpu_ms'])
                                                           for r in runs))} for m in names} for f in folders}
    print(f'\nCPU ms (mean over {len(runs)} rotations of the folder order; x: geometric-mean ratio to the first)')
    print(f'{"":<16}' + ''.join(f'{str(f)[-22:]:>24}' for f in folders))
    for m in names:
        print(f'{m:<16}' + ''.join(f'{result[f][m]["cpu_ms"]:>14.2f} ({result[f][m]["vs_first"]:5.3f}x)'
                                   for f in folders))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({'runs': args.runs, 'threads': args.threads, 'rotations': runs,
                                         'results': result}, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
