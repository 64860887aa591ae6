#!/usr/bin/env python3
"""Where a PolicyRunner's resident memory goes, stage by stage (ONNX Runtime, CPU).

    python benchmarks/runner_memory.py out/rs_smollm2/policy_smollm2-360m_int4
    python benchmarks/runner_memory.py FOLDER --variants default no-arena --chunks 3

Each variant runs in a fresh process: PolicyRunner.load's steps are taken one at a time (an OrtEngine subclass marks
the stages from inside the engine's own build), and after each the process's RSS, anonymous and file-backed RSS
(/proc/self/status) and the mappings that grew most (/proc/self/smaps: a file's name, [heap], [anon]) are printed:

    bare            Python, numpy, ONNX Runtime and the runtime's modules imported (real_size.py's process_rss_gb)
    folder          load_policy_folder: manifest verified (sha256 of every file, read in chunks), policy.yaml parsed
    tables          tables.safetensors opened (memory-mapped)
    session vision / session backbone   each InferenceSession created (pre-packing happens here)
    engine          the KV cache allocated
    runner          the preprocessor (tokenizer) built
    warm-up chunk   runner.warmup(n=1) on an image of the policy's size (real_size.py's: it reads runner_rss_gb here)
    chunk 1..N      one predict each on a 640 x 480 camera frame (its resize loads OpenCV)

A variant adds session config entries / SessionOptions attributes (session_memory.VARIANTS) to the runtime's own
session options; the CPU ms of the last chunk (1 thread) shows its cost in speed. Printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from proc_status import status_gb  # benchmarks/: the script's own folder is on sys.path
from session_memory import VARIANTS


def mapped_gb() -> dict:
    """{mapping name: resident GB} over /proc/self/smaps: a file's base name, or [heap] / [anon] / [stack] ..."""
    out, name = defaultdict(float), None
    with open('/proc/self/smaps') as f:
        for line in f:
            head = line.split()
            if head and not head[0].endswith(':'):  # a mapping's first line: range perms offset dev inode [path]
                name = Path(head[5]).name if len(head) > 5 else '[anon]'
            elif head and head[0] == 'Rss:':
                out[name] += int(head[1]) * 1024 / 1e9
    return dict(out)


def child(folder: Path, variant: str, chunks: int, threads: int) -> list:
    import numpy as np

    from blockvla_ros.runtime.ort_engine import OrtEngine
    from blockvla_ros.runtime.policy_folder import load_policy_folder
    from blockvla_ros.runtime.runner import PolicyRunner

    import onnxruntime  # noqa: F401  (imported by the engine anyway: part of the bare process)

    rows = []

    def mark(stage: str, **extra) -> None:
        rows.append({'stage': stage, 'rss': status_gb('VmRSS'), 'anon': status_gb('RssAnon'),
                     'file': status_gb('RssFile'), 'mapped': mapped_gb(), **extra})

    config, attrs, disabled = VARIANTS[variant]

    class Probe(OrtEngine):
        def _start(self):
            mark('tables')
            super()._start()

        def _session(self, key):
            out = super()._session(key)
            mark(f'session {key}')
            return out

        def session_options(self):
            so = super().session_options()
            for k, v in config.items():
                so.add_session_config_entry(k, v)
            for k, v in attrs.items():
                setattr(so, k, getattr(self.ort.GraphOptimizationLevel, v) if k == 'graph_optimization_level' else v)
            return so

    if disabled:
        raise SystemExit(f'variant {variant}: disabled optimizers are session_memory.py only')
    mark('bare')
    spec = load_policy_folder(folder)
    mark('folder')
    engine = Probe(spec, threads=threads)
    mark('engine')
    runner = PolicyRunner(spec, engine, 'onnxruntime')
    mark('runner')
    size = runner.config.image_size
    c0 = time.process_time()
    runner.warmup(n=1, image_shape=(size, size))  # real_size.py's warm-up: no resize
    mark('warm-up chunk', cpu_ms=(time.process_time() - c0) * 1e3)
    image = np.full((480, 640, 3), 128, np.uint8)  # a camera frame: resized (OpenCV loads)
    state = None
    if runner.config.state_dim:
        state = (np.asarray(spec.stats.state_low) + np.asarray(spec.stats.state_high)) / 2
    for i in range(chunks):
        c0 = time.process_time()
        runner.predict(image, f'pick up the red block {i}', state)
        mark(f'chunk {i + 1}', cpu_ms=(time.process_time() - c0) * 1e3)
    rows[-1]['peak'] = status_gb('VmHWM')
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folder', type=Path)
    p.add_argument('--variants', nargs='+', default=['default'], choices=[k for k, v in VARIANTS.items() if not v[2]])
    p.add_argument('--chunks', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--child', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.folder, args.child, args.chunks, args.threads)))
        return 0
    for variant in args.variants:
        proc = subprocess.run([sys.executable, __file__, str(args.folder), '--child', variant, '--chunks',
                               str(args.chunks), '--threads', str(args.threads)], capture_output=True, text=True)
        if proc.returncode:
            print(f'{variant}: failed: {proc.stderr.strip()[-400:]}')
            continue
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f'\n{args.folder} variant {variant}, {args.threads} thread(s); GB (mapped: the '
              'mappings that grew most: a file, [heap] or [anon])')
        print(f'{"stage":<18} {"RSS":>6} {"+":>6} {"anon":>6} {"file":>6}  mapped')
        prev, before = rows[0]['rss'], {}
        for r in rows:
            grew = {k: v - before.get(k, 0.0) for k, v in r['mapped'].items()}
            mapped = ' '.join(f'{k} {d:+.3f}' for k, d in sorted(grew.items(), key=lambda kv: -abs(kv[1]))[:4]
                              if abs(d) >= 0.002 and r is not rows[0])
            before = r['mapped']
            cpu = f'  [{r["cpu_ms"]:.0f} CPU-ms]' if 'cpu_ms' in r else ''
            print(f'{r["stage"]:<18} {r["rss"]:6.3f} {r["rss"] - prev:+6.3f} {r["anon"]:6.3f} {r["file"]:6.3f}  '
                  f'{mapped}{cpu}')
            prev = r['rss']
        print(f'peak (VmHWM) {rows[-1]["peak"]:.3f} GB')
    return 0


if __name__ == '__main__':
    sys.exit(main())
