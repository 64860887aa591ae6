#!/usr/bin/env python3
"""Where an export's peak RSS comes from: blockvla-export's phases, each with its own peak (printed, never asserted).

    nice -n 10 python benchmarks/export_memory.py --checkpoint out/rs_work/checkpoint_qwen2.5-0.5b --precision int4

Runs `export_policy` in this process (no calibration; parity off, like benchmarks/real_size.py, unless
--parity-samples says otherwise: blockvla-export checks 4 by default, reloading the fp32 reference after an int8 /
int4 / fp16 export) with its phases wrapped: load_checkpoint, export_vision, export_backbone, _write_tables,
quantize_weights, _record_parity (the torch reference's side of the parity check), _check_parity (ONNX Runtime's)...
For each phase: RSS before, the peak during it and RSS after. The peak is exact, not sampled: the kernel's high-water
mark (VmHWM) is reset at each phase boundary (writing 5 to /proc/self/clear_refs, Linux >= 4.0) and read at the next,
so a C call that holds the GIL cannot hide a spike. Time between phases is its own row ('(between)').
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

from proc_status import status_gb  # benchmarks/: the script's own folder is on sys.path

PHASES = ('load_checkpoint', 'export_vision', 'export_backbone', '_write_tables', 'quantize_weights', '_policy_doc',
          'write_manifest', '_record_parity', '_check_parity')


def reset_peak() -> None:
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current RSS


class PhaseLog:
    """Rows of (phase, seconds, rss_before_gb, peak_gb, rss_after_gb); a row for the time between phases too."""

    def __init__(self):
        self.rows, self.depth, self.t = [], 0, time.perf_counter()
        reset_peak()

    def _close_between(self):
        peak, now = status_gb('VmHWM'), time.perf_counter()
        if self.rows or now - self.t > 0:
            self.rows.append({'phase': '(between)', 'seconds': now - self.t, 'peak_gb': peak,
                              'rss_after_gb': status_gb('VmRSS')})
        return now

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if self.depth:  # nested phase: counted in its parent
                return fn(*args, **kwargs)
            start = self._close_between()
            before = status_gb('VmRSS')
            reset_peak()
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                self.rows.append({'phase': name, 'seconds': time.perf_counter() - start, 'rss_before_gb': before,
                                  'peak_gb': status_gb('VmHWM'), 'rss_after_gb': status_gb('VmRSS')})
                reset_peak()
                self.t = time.perf_counter()
        return wrapped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', type=Path, required=True)
    p.add_argument('--precision', default='fp32')
    p.add_argument('--out', type=Path, help='policy folder to write (default: a temporary one, removed)')
    p.add_argument('--inline-limit-mb', type=float, help='default: the exporter\'s (export.onnx_export.INLINE_LIMIT; '
                   'the profiles in docs/benchmarks/real_size.md before it became 16 MiB ran at 1024)')
    p.add_argument('--quant-accuracy-level', type=int)
    p.add_argument('--parity-samples', type=int, default=0,
                   help='observations of the exporter\'s parity check (default 0: off; blockvla-export\'s default is '
                        '4; the peak does not grow with the count: one observation at a time)')
    p.add_argument('--json', type=Path)
    args = p.parse_args(argv)

    import logging

    import blockvla_ros.export.policy_writer as writer

    logging.getLogger('onnxruntime').setLevel(logging.WARNING)  # its quantizer logs every node at INFO

    log = PhaseLog()
    for name in PHASES:
        if hasattr(writer, name):
            setattr(writer, name, log.wrap(name, getattr(writer, name)))
    if not args.out:  # a temporary folder under out/ (the disk the exports go to), made on a fresh checkout too
        Path('out').mkdir(exist_ok=True)
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix='blockvla_export_memory_', dir='out')
    out = args.out or Path(tmp.name) / 'policy'
    t0 = time.perf_counter()
    writer.export_policy(args.checkpoint, out, precision=args.precision, parity_samples=args.parity_samples,
                         progress=False,
                         inline_limit=writer.INLINE_LIMIT if args.inline_limit_mb is None else
                         int(args.inline_limit_mb * 2**20),
                         quant_accuracy_level=args.quant_accuracy_level)
    log._close_between()
    total = time.perf_counter() - t0
    print(f'{args.checkpoint.name} {args.precision}: {total:.0f} s; the process peak is the largest "peak" below')
    print(f'{"phase":<18} {"s":>6} {"RSS before":>11} {"peak GB":>8} {"RSS after":>10}')
    for r in log.rows:
        if r['phase'] == '(between)' and r['seconds'] < 0.05 and r['peak_gb'] <= r['rss_after_gb'] + 0.01:
            continue
        print(f'{r["phase"]:<18} {r["seconds"]:6.1f} {r.get("rss_before_gb", float("nan")):11.2f} '
              f'{r["peak_gb"]:8.2f} {r["rss_after_gb"]:10.2f}')
    if args.json:
        args.json.write_text(json.dumps({'checkpoint': str(args.checkpoint), 'precision': args.precision,
                                         'parity_samples': args.parity_samples, 'seconds': total,
                                         'phases': log.rows}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
