#!/usr/bin/env python3
"""One backbone matmul on ONNX Runtime's CPU provider: fp32 MatMul vs MatMulNBits int8 / int4 at each accuracy_level.

    nice -n 10 python benchmarks/matmul_nbits.py                      # Qwen2.5-0.5B's MLP: K=896, N=4864
    nice -n 10 python benchmarks/matmul_nbits.py --k 4864 --n 896 --tokens 3 65

What export.quantize writes (symmetric blocks of 32, the same kernels), timed alone so that the accuracy level's
effect is not buried in a whole chunk: CPU ms per call (process time over --calls calls, 1 intra-op thread), for
token counts M (3: a block step of the demo policy; 65: its prefix), and the max |diff| vs the fp32 product
relative to its max |value|. Random weights; printed, never asserted. Interleaved: every variant is timed once per
round, --rounds rounds, median taken (the machine is shared).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def graph(k: int, n: int, bits: int = 0, level: int = 0, weight=None):
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
        packed, scales = quantize_matrix(weight, bits, 32)
        inits = [onnx.numpy_helper.from_array(packed, 'w_q'), onnx.numpy_helper.from_array(scales, 'w_s')]
        attrs = dict(K=k, N=n, bits=bits, block_size=32, **({'accuracy_level': level} if level else {}))
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
    p.add_argument('--calls', type=int, default=50)
    p.add_argument('--rounds', type=int, default=5)
    args = p.parse_args(argv)

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((args.k, args.n)) * 0.02).astype(np.float32)
    variants = {'fp32': graph(args.k, args.n, weight=weight)}
    for bits in (8, 4):
        for level in args.levels:
            variants[f'int{bits} level {level}'] = graph(args.k, args.n, bits, level, weight)
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
    return 0


if __name__ == '__main__':
    sys.exit(main())
