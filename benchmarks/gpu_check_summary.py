#!/usr/bin/env python3
"""The tables of a gpu_check.sh run (README "GPU and Jetson" takes them): DIR/summary.md, also printed.

    python benchmarks/gpu_check_summary.py out/gpu_check

Reads what the check wrote into DIR: env.json, requires_cuda.xml (pytest junit), gpu_latency_*.json,
decode_latency_small_cuda.json. A file that is missing (its step failed or ran out of time) is named as missing.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

DECODERS = ('blockdiff', 'ar', 'fulldiff', 'fulldiff_nocache')


def tests_section(path: Path) -> list:
    if not path.is_file():
        return [f'requires_cuda tests: no report ({path.name} missing)']
    lines, counts = ['| test | outcome | reported |', '| --- | --- | --- |'], {'passed': 0, 'failed': 0, 'skipped': 0}
    for case in ET.parse(path).getroot().iter('testcase'):
        outcome = 'passed'
        for tag in ('failure', 'error', 'skipped'):
            node = case.find(tag)
            if node is not None:
                outcome = 'skipped: ' + (node.get('message') or '')[:80] if tag == 'skipped' else 'FAILED'
        counts['skipped' if outcome.startswith('skipped') else outcome.lower()] += 1
        props = ', '.join(f'{p.get("name")} {float(p.get("value")):.4g}' for p in case.iter('property'))
        lines.append(f'| {case.get("name")} | {outcome} | {props} |')
    return [f'requires_cuda tests: {counts["passed"]} passed, {counts["failed"]} failed, {counts["skipped"]} skipped',
            ''] + lines


def engine_line(name: str, e: dict) -> str:
    """What an engine ran as: a capture that failed (a warning in the log) shows as a missing shape and eager passes."""
    return (f'{name}: {e.get("device")} {e.get("dtype")}, CUDA graphs {"on" if e.get("cuda_graphs") else "off"}, '
            f'captured shapes {e.get("captured_shapes")}, eager passes {e.get("eager_passes")}.')


def latency_section(path: Path) -> list:
    if not path.is_file():
        return [f'{path.name}: missing']
    d = json.loads(path.read_text())
    p = d['policy']
    lines = [f'**{d["shape"]}** ({p["params_m"]:.1f} M params, prefix {p["prefix_len"]}, {p["action_tokens"]} action '
             f'tokens, B = {p["block_size"]}, {p["steps_per_block"]} passes/block) on {d["gpu"] or d["device"]}, '
             f'torch {d["torch"]}, {d["runs"]} interleaved runs; ms per chunk (median, prefill included):', '',
             '| engine | ' + ' | '.join(DECODERS) + ' | blockdiff vs AR | vs fulldiff (cached / not) |',
             '| --- |' + ' ---: |' * (len(DECODERS) + 2)]
    for name, rows in d['results'].items():
        ms = {r['decoder']: r for r in rows}
        r = d['ratios'][name]
        cells = [f'{ms[k]["median_ms"]:.2f} ({ms[k]["nfe"]} NFE)' for k in DECODERS]
        cells += [f'{r["blockdiff_vs_ar_speedup"]:.2f}x',
                  f'{r["blockdiff_vs_fulldiff_cached_speedup"]:.2f}x / {r["blockdiff_vs_fulldiff_speedup"]:.2f}x']
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    lines += [''] + [engine_line(name, e) for name, e in d['engines'].items()]
    a = d['bf16_vs_fp32']
    lines += ['', f'bf16 vs fp32 on the same device: token agreement {a["token_agreement"]:.3f} ({a["tokens"]} '
              f'tokens), lock-step max |logit diff| {a["max_abs_logit_diff"]:.4f}.']
    if 'cuda_graphs_speedup' in d:
        speedup = d['cuda_graphs_speedup']
        lines.append('CUDA graphs vs eager (fp32): ' + ', '.join(f'{k} {v:.2f}x' for k, v in speedup.items()) + '.')
    for name, per in d['per_pass'].items():
        lines.append(f'{name} per pass: ' + ', '.join(f'{k} {v["median_ms"]:.3f} ms' for k, v in per.items()) + '.')
    mem = d['memory']
    if mem.get('after_warmup_and_runs'):
        a, b = mem['after_warmup_and_runs'], mem['after_2_more_chunks']
        lines.append(f'GPU memory allocated {a["allocated_bytes"]} -> {b["allocated_bytes"]} bytes over 2 more chunks '
                     f'per engine (peak {b["max_allocated_bytes"] / 2**20:.0f} MiB).')
    return lines


def decode_latency_section(path: Path) -> list:
    if not path.is_file():
        return [f'{path.name}: missing']
    d = json.loads(path.read_text())
    rows = {e: {r['decoder']: r['median_ms'] for r in rs} for e, rs in d['results'].items()}
    t = d.get('torch_engine', {})
    lines = [f'decode_latency ({d["config"]}, {d["runs"]} runs): torch on {t.get("device")} ({t.get("dtype")}, CUDA '
             f'graphs {t.get("cuda_graphs")}) vs ONNX Runtime on the CPU ({d["threads"]} threads), ms per chunk:', '',
             '| engine | ' + ' | '.join(DECODERS) + ' |', '| --- |' + ' ---: |' * len(DECODERS)]
    for e, ms in rows.items():
        lines.append(f'| {e} | ' + ' | '.join(f'{ms[k]:.2f}' for k in DECODERS) + ' |')
    return lines + (['', engine_line('torch', t)] if t else [])


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    env = json.loads((folder / 'env.json').read_text()) if (folder / 'env.json').is_file() else {}
    out = ['# GPU check', '', f'GPUs {env.get("gpus")}, torch {env.get("torch")} (CUDA {env.get("cuda")}), '
           f'transformers {env.get("transformers")}, missing: {env.get("missing")}', '']
    out += tests_section(folder / 'requires_cuda.xml') + ['']
    for path in sorted(folder.glob('gpu_latency_*.json')) or [folder / 'gpu_latency_small.json']:
        out += latency_section(path) + ['']
    out += decode_latency_section(folder / 'decode_latency_small_cuda.json')
    text = '\n'.join(out) + '\n'
    (folder / 'summary.md').write_text(text)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
