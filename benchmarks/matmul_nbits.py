#!/usr/bin/env python3
"""One backbone matmul on ONNX Runtime's CPU provider: fp32 MatMul vs MatMulNBits int8 / int4 at each accuracy_level.

    nice -n 10 python benchmarks/matmul_nbits.py                      # Qwen2.5-0.5B's MLP: K=896, N=4864
    nice -n 10 python benchmarks/matmul_nbits.py --k 4864 --n 896 --tokens 3 65
    nice -n 10 python benchmarks/matmul_nbits.py --blocks 32 64 128 --levels 1 4 --memory   # block sizes, RSS

What export.quantize writes (symmetric blocks of --blocks, default 32, the same kernels), timed alone so that the
accuracy level's and the block size's effects are not buried in a whole chunk: CPU ms per call (process time over
--calls calls, 1 intra-op thread), for token counts M (3: a block step of the demo policy; 65: its prefix), and the
max |diff| vs the fp32 product relative to its max |value| (the rounding a block size costs). --memory: each
variant's session alone in a fresh process, the RSS it adds after load and one run, against its stored weight bytes
(ONNX Runtime pre-packs MatMulNBits weights at session creation; compare the variants with each other: a session
built from bytes also holds its parsed copy of the weights, which a policy folder's external data file does not).
Random weights; printed, never asserted. Interleaved: every variant is timed once per round, --rounds rounds, median
taken (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

from proc_status import status_gb  # benchmarks/: the script's own folder is on sys.path


def graph(k: int, n: int, bits: int = 0, level: int = 0, weight=None, block: int = 32):
    """fp32 MatMul (bits 0) or MatMulNBits of `weight` [K, N], as a serialised model."""
    import onnx
    from onnx import TensorProto, helper

    from blockvla_ros.export.quantize import quantize_matrix

    a = helper.make_tensor_value_info('a', TensorProto.FLOAT, ['m', k])
    y = helper.make_tensor_value_info('y', TensorProto.FLOAT, ['m', n])
    if not bits:
        inits = [onnx.numpy_helper.from_array(weight, 'w')]
        node = helper.make_node('MatMul', ['a', 'w'], ['y'])
    else:
        packed, scales = quantize_matrix(weight, bits, block)
        inits = [onnx.numpy_helper.from_array(packed, 'w_q'), onnx.numpy_helper.from_array(scales, 'w_s')]
        attrs = dict(K=k, N=n, bits=bits, block_size=block, **({'accuracy_level': level} if level else {}))
        node = helper.make_node('MatMulNBits', ['a', 'w_q', 'w_s'], ['y'], domain='com.microsoft', **attrs)
    g = helper.make_graph([node], 'mm', [a], [y], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid('', 20), helper.make_opsetid('com.microsoft', 1)],
                              ir_version=10)
    return model.SerializeToString()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--k', type=int, default=896)
    p.add_argument('--n', type=int, default=4864)
    p.add_argument('--tokens', type=int, nargs='+', default=[3, 65])
    p.add_argument('--levels', type=int, nargs='+', default=[0, 4])
    p.add_argument('--blocks', type=int, nargs='+', default=[32], help='MatMulNBits block sizes')
    p.add_argument('--bits', type=int, nargs='+', default=[8, 4], choices=(8, 4))
    p.add_argument('--memory', action='store_true', help='also the RSS each session adds (one process per variant)')
    p.add_argument('--child', help=argparse.SUPPRESS)
    p.add_argument('--calls', type=int, default=50)
    p.add_argument('--rounds', type=int, default=5)
    args = p.parse_args(argv)

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((args.k, args.n)) * 0.02).astype(np.float32)
    specs = {'fp32': (0, 0, 32)}
    for bits in args.bits:
        for block in args.blocks:
            for level in args.levels:
                specs[f'int{bits} b{block} l{level}'] = (bits, level, block)
    if args.child:
        return memory_child(args, weight, *specs[args.child])
    variants = {name: graph(args.k, args.n, bits, level, weight, block) for name, (bits, level, block) in specs.items()}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sessions = {name: ort.InferenceSession(m, opts, providers=['CPUExecutionProvider']) for name, m in variants.items()}
    print(f'K={args.k} N={args.n}, {args.calls} calls x {args.rounds} rounds, 1 thread, ORT {ort.__version__}')
    print(f'{"variant":<16} ' + ' '.join(f'{"M=" + str(m) + " ms":>10} {"x fp32":>7} {"rel err":>8}'
                                         for m in args.tokens))
    rows = {name: [] for name in sessions}
    for m in args.tokens:
        a = rng.standard_normal((m, args.k)).astype(np.float32)
        ref = a @ weight
        times = {name: [] for name in sessions}
        for _ in range(args.rounds):
            for name, s in sessions.items():
                s.run(None, {'a': a})
                t0 = time.process_time()
                for _ in range(args.calls):
                    out = s.run(None, {'a': a})[0]
                times[name].append((time.process_time() - t0) * 1e3 / args.calls)
        base = statistics.median(times['fp32'])
        for name, s in sessions.items():
            out = s.run(None, {'a': a})[0]
            ms = statistics.median(times[name])
            rows[name].append(f'{ms:10.3f} {ms / base:7.2f} {np.abs(out - ref).max() / np.abs(ref).max():8.1e}')
    for name, cells in rows.items():
        print(f'{name:<16} ' + ' '.join(cells))
    if args.memory:
        del sessions
        print(f'\nRSS a session adds (fresh process each; weights: bytes stored in the graph), M={args.tokens[0]}')
        print(f'{"variant":<16} {"weights MB":>10} {"RSS MB":>8} {"x weights":>9}')
        for name in specs:
            cmd = [sys.executable, __file__, '--child', name, '--k', str(args.k), '--n', str(args.n), '--tokens',
                   str(args.tokens[0]), '--blocks', *map(str, args.blocks), '--levels', *map(str, args.levels),
                   '--bits', *map(str, args.bits)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f'{name:<16} failed: {proc.stderr.strip().splitlines()[-1][:120]}')
                continue
            stored, added = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f'{name:<16} {stored / 1e6:10.2f} {added / 1e6:8.2f} {added / stored:9.2f}')
    return 0


def memory_child(args, weight, bits: int, level: int, block: int) -> int:
    """Print [stored weight bytes, RSS the session adds after load and one run] for one variant (own process)."""
    import onnxruntime as ort

    model = graph(args.k, args.n, bits, level, weight, block)
    stored = len(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    before = status_gb('VmRSS')
    s = ort.InferenceSession(model, opts, providers=['CPUExecutionProvider'])  # `model` stays: not counted
    s.run(None, {'a': np.zeros((args.tokens[0], args.k), np.float32)})
    print(json.dumps([stored, (status_gb('VmRSS') - before) * 1e9]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
