#!/usr/bin/env python3
"""What an ONNX Runtime CPU session of a policy's backbone holds in memory, under each session option tried.

    nice -n 10 python benchmarks/session_memory.py models/x_int4 [--options default no-arena device-alloc ...]
    python benchmarks/session_memory.py some/backbone.onnx         # a graph file alone (+ its .data)

Each variant runs in a fresh process (its memory its own): the backbone graph (a policy folder's, or a graph file)
is loaded with the runtime's session options (runtime.ort_engine) plus the variant's, then run once at a prefix
shape (n = 65, past = 1) and --runs times at a block-step shape (n = 3 tokens, past = 64): RSS after load, after the
runs (anonymous and file-backed) and the peak (VmHWM), against the bytes of the graph's weights (backbone.onnx + its
external data). The CPU ms of one block-step pass (median) shows what an option or an accuracy level costs in
speed. Printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from proc_status import status_gb  # benchmarks/: the script's own folder is on sys.path

VARIANTS = {  # name -> (session config entries, SessionOptions attributes, disabled optimizers)
    'default': ({}, {}, []),
    'no-arena': ({}, {'enable_cpu_mem_arena': False}, []),
    'device-alloc': ({'session.use_device_allocator_for_initializers': '1'}, {}, []),
    'device-alloc+no-arena': ({'session.use_device_allocator_for_initializers': '1'},
                              {'enable_cpu_mem_arena': False}, []),
    'no-prepack': ({'session.disable_prepacking': '1'}, {}, []),
    'no-mmap': ({'session.disable_mmap_for_external_initializers': '1'}, {}, []),
    'no-const-folding': ({}, {}, ['ConstantFolding']),
    'basic-opt': ({}, {'graph_optimization_level': 'ORT_ENABLE_BASIC'}, []),
}


def child(folder: str, variant: str, runs: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from blockvla_ros.runtime.ort_engine import OrtEngine

    path = Path(folder) / 'backbone.onnx' if Path(folder).is_dir() else Path(folder)
    config, attrs, disabled = VARIANTS[variant]
    so = OrtEngine.session_options(type('E', (), {'ort': ort, 'threads': 1})())
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    for k, v in attrs.items():
        setattr(so, k, getattr(ort.GraphOptimizationLevel, v) if k == 'graph_optimization_level' else v)
    base = status_gb('VmRSS')
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), so, providers=['CPUExecutionProvider'], disabled_optimizers=disabled or None)
    load_s = time.perf_counter() - t0
    loaded = status_gb('VmRSS')
    inputs = {i.name: i for i in sess.get_inputs()}
    layers = sum(name.startswith('past_key_') for name in inputs)
    _, kv_heads, _, head_dim = inputs['past_key_0'].shape
    dtype = np.float16 if inputs['embeds'].type == 'tensor(float16)' else np.float32
    hidden = inputs['embeds'].shape[2]
    windows = inputs['mask'].shape[0]
    rope = len(inputs['positions'].shape)

    def feeds(n, past):
        pos = np.arange(past, past + n)[None]
        return {'embeds': np.zeros((1, n, hidden), dtype),
                'positions': (pos if rope == 2 else np.broadcast_to(pos, (3, 1, n))).astype(np.int64),
                'mask': np.ones((windows if isinstance(windows, int) else 1, 1, n, past + n), bool),
                **({'logit_rows': np.arange(n, dtype=np.int64)} if 'logit_rows' in inputs else {}),
                **{f'past_{kv}_{i}': np.zeros((1, kv_heads, past, head_dim), dtype)
                   for i in range(layers) for kv in ('key', 'value')}}

    sess.run(None, feeds(65, 1))
    step = feeds(3, 64)
    cpu = []
    for _ in range(runs):
        c0 = time.process_time()
        sess.run(None, step)
        cpu.append((time.process_time() - c0) * 1e3)
    weights = sum(p.stat().st_size for p in path.parent.glob(path.name + '*'))
    return {'variant': variant, 'base_gb': base, 'loaded_gb': loaded, 'after_runs_gb': status_gb('VmRSS'),
            'peak_gb': status_gb('VmHWM'), 'anon_gb': status_gb('RssAnon'), 'file_gb': status_gb('RssFile'),
            'graph_gb': weights / 1e9, 'load_s': load_s,
            'step_cpu_ms': statistics.median(cpu)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folder', type=Path)
    p.add_argument('--options', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--child', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(str(args.folder), args.child, args.runs)))
        return 0
    print(f'{args.folder}: backbone session, 1 thread')
    print(f'{"variant":<24} {"load s":>7} {"RSS load":>9} {"RSS run":>8} {"peak":>6} {"graph GB":>9} '
          f'{"run-base x graph":>17} {"anon":>5} {"file":>5} {"step cpu ms":>12}')
    for variant in args.options:
        proc = subprocess.run([sys.executable, __file__, str(args.folder), '--child', variant, '--runs',
                               str(args.runs)], capture_output=True, text=True)
        if proc.returncode:
            print(f'{variant:<24} failed: {proc.stderr.strip().splitlines()[-1][:120]}')
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f'{variant:<24} {r["load_s"]:7.1f} {r["loaded_gb"]:9.2f} {r["after_runs_gb"]:8.2f} {r["peak_gb"]:6.2f} '
              f'{r["graph_gb"]:9.2f} {(r["after_runs_gb"] - r["base_gb"]) / r["graph_gb"]:17.2f} '
              f'{r["anon_gb"]:5.2f} {r["file_gb"]:5.2f} '
              f'{r["step_cpu_ms"]:12.1f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
