#!/usr/bin/env python3
"""What an ONNX Runtime CPU session of a policy's backbone holds in memory, under each session option tried.

    nice -n 10 python benchmarks/session_memory.py models/x_int4 [--options default no-arena device-alloc ...]
    python benchmarks/session_memory.py some/backbone.onnx         # a graph file alone (+ its .data)
    python benchmarks/session_memory.py models/x_int4 --accuracy-levels 1 4 --options default no-prepack

Each variant runs in a fresh process (its memory its own): the backbone graph (a policy folder's, or a graph file)
is loaded with the runtime's session options (runtime.ort_engine) plus the variant's, then run once at a prefix
shape (n = 65, past = 1) and --runs times at a block-step shape (n = 3 tokens, past = 64): RSS after load, after the
runs (anonymous and file-backed) and the peak (VmHWM), against the bytes of the graph's weights (backbone.onnx + its
external data). The CPU ms of one block-step pass (median) shows what an option or an accuracy level costs in
speed. --accuracy-levels: each variant again with the graph's MatMulNBits accuracy_level set to each level (a
rewritten copy of the graph file, its external data linked, in a temp folder), to separate what int8 compute's
pre-packed layout costs from the rest. Printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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


def with_accuracy_level(path: Path, level: int, folder: Path) -> Path:
    """A copy of graph `path` in `folder` whose MatMulNBits nodes have accuracy_level `level` (0: unset), its
    external-data file(s) hard-linked beside it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == 'MatMulNBits':
            kept = [a for a in node.attribute if a.name != 'accuracy_level']
            del node.attribute[:]
            node.attribute.extend(kept + ([onnx.helper.make_attribute('accuracy_level', level)] if level else []))
    for data in path.parent.glob(path.name + '.data'):  # ONNX Runtime refuses external data through a symlink
        try:
            os.link(data, folder / data.name)
        except OSError:  # another file system: a copy
            shutil.copyfile(data, folder / data.name)
    onnx.save_model(model, str(folder / path.name))
    return folder / path.name


def child(folder: str, variant: str, runs: int, level=None) -> dict:
    import tempfile

    path = Path(folder) / 'backbone.onnx' if Path(folder).is_dir() else Path(folder)
    if level is None:
        return measure(path, variant, runs)
    with tempfile.TemporaryDirectory(prefix='.session_memory_', dir=path.parent.parent) as tmp:  # a sibling: links
        return measure(with_accuracy_level(path, level, Path(tmp)), variant, runs)


def measure(path: Path, variant: str, runs: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from blockvla_ros.runtime.ort_engine import OrtEngine

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
    weights = sum(p.stat().st_size for p in path.parent.glob(path.name + '*'))  # through the links
    return {'variant': variant, 'base_gb': base, 'loaded_gb': loaded, 'after_runs_gb': status_gb('VmRSS'),
            'peak_gb': status_gb('VmHWM'), 'anon_gb': status_gb('RssAnon'), 'file_gb': status_gb('RssFile'),
            'graph_gb': weights / 1e9, 'load_s': load_s,
            'step_cpu_ms': statistics.median(cpu)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folder', type=Path)
    p.add_argument('--options', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--accuracy-levels', type=int, nargs='+', choices=(0, 1, 2, 3, 4),
                   help="MatMulNBits accuracy levels to set in a copy of the graph (default: the graph's own)")
    p.add_argument('--child', help=argparse.SUPPRESS)
    p.add_argument('--level', type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(str(args.folder), args.child, args.runs, args.level)))
        return 0
    print(f'{args.folder}: backbone session, 1 thread')
    print(f'{"variant":<24} {"load s":>7} {"RSS load":>9} {"RSS run":>8} {"peak":>6} {"graph GB":>9} '
          f'{"run-base x graph":>17} {"anon":>5} {"file":>5} {"step cpu ms":>12}')
    for level in args.accuracy_levels or [None]:
        for variant in args.options:
            name = variant if level is None else f'{variant} level {level}'
            proc = subprocess.run([sys.executable, __file__, str(args.folder), '--child', variant, '--runs',
                                   str(args.runs)] + ([] if level is None else ['--level', str(level)]),
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f'{name:<24} failed: {proc.stderr.strip().splitlines()[-1][:120]}')
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print_row(name, r)
    return 0


def print_row(name: str, r: dict) -> None:
    print(f'{name:<24} {r["load_s"]:7.1f} {r["loaded_gb"]:9.2f} {r["after_runs_gb"]:8.2f} {r["peak_gb"]:6.2f} '
          f'{r["graph_gb"]:9.2f} {(r["after_runs_gb"] - r["base_gb"]) / r["graph_gb"]:17.2f} '
          f'{r["anon_gb"]:5.2f} {r["file_gb"]:5.2f} {r["step_cpu_ms"]:12.1f}')


if __name__ == '__main__':
    sys.exit(main())
