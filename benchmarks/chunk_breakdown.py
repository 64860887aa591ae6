#!/usr/bin/env python3
"""Where one chunk's CPU time goes on ONNX Runtime (CPU), for one policy folder.

    python benchmarks/chunk_breakdown.py FOLDER [--decoder blockdiff] [--runs 10] [--reuse] [--ort-profile]
                                                [--no-fold]

Three views, all in CPU time of the decoding thread (`time.thread_time`; 1 intra-op thread, so ONNX Runtime
computes on it too):

    accounting   the chunk split by wrapping the engine's parts: vision encoder, each backbone pass kind (by token
                 count n), and everything else (numpy / Python: masks, positions, table lookups, cache writes, input
                 copies, the decoder's softmax / argmax / confidence), per chunk, over --runs chunks
    floor        the same pass shapes through a graph holding only the backbone's weight matmuls (random weights of
                 the policy's dimensions, read from the folder): what a pass of n tokens costs at least on this CPU
    op types     (--ort-profile) ONNX Runtime's own profiler over the same chunks: kernel time by op type, weight
                 matmuls (a prepacked constant operand) apart from attention matmuls, per pass kind

Profiling distorts absolute times (the profiler records every node); read its shares, not its milliseconds.
`--reuse` keeps the instruction's K/V across chunks (the node's default); `--no-fold` runs the prefill as its own
pass instead of folding it into the first refine pass (`Decoder(fold_prefill=False)`). Timings are printed, never
asserted.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

INSTRUCTION = 'put the red block on the plate'


def _open(folder: Path, reuse: bool, profile_dir=None):
    from blockvla_ros.runtime.ort_engine import OrtEngine
    from blockvla_ros.runtime.policy_folder import load_policy_folder
    from blockvla_ros.runtime.runner import build_preprocessor

    spec = load_policy_folder(folder)
    pre = build_preprocessor(spec.config, spec.stats, folder)
    rng = np.random.default_rng(1)
    s = spec.config.image_size
    prefixes = [pre(rng.integers(0, 256, (s, s, 3), dtype=np.uint8), INSTRUCTION) for _ in range(4)]
    if profile_dir is not None:
        class Profiled(OrtEngine):
            def session_options(self):
                so = super().session_options()
                so.enable_profiling, so.profile_file_prefix = True, str(Path(profile_dir) / 'ort')
                return so
        return spec, prefixes, Profiled(spec, threads=1, reuse_text_kv=reuse)
    return spec, prefixes, OrtEngine(spec, threads=1, reuse_text_kv=reuse)


def accounting(engine, decoder, prefixes, runs: int) -> dict:
    """CPU ms per chunk by part (see the module doc)."""
    spent = collections.defaultdict(float)

    def timed(obj, name, key):
        inner = getattr(obj, name)

        def call(*args, **kwargs):
            c = time.thread_time()
            out = inner(*args, **kwargs)
            spent[key(*args) if callable(key) else key] += time.thread_time() - c
            return out
        setattr(obj, name, call)

    timed(engine, '_vision', 'vision encoder')
    timed(engine, '_backbone', lambda embeds, *_: f'backbone passes n={embeds.shape[1]}')
    calls = collections.Counter()
    inner_backbone = engine._backbone
    engine._backbone = lambda embeds, *a: (calls.update([embeds.shape[1]]), inner_backbone(embeds, *a))[1]
    for i in range(2):  # warm-up: every pass shape bound once
        decoder(engine, prefixes[i % len(prefixes)])
    spent.clear()
    calls.clear()
    totals = []
    for i in range(runs):
        c = time.thread_time()
        decoder(engine, prefixes[i % len(prefixes)])
        totals.append(time.thread_time() - c)
    out = {k: v / runs * 1e3 for k, v in spent.items()}
    out['numpy / Python (the rest)'] = sum(totals) / runs * 1e3 - sum(out.values())
    return {'chunk_ms': statistics.median(totals) * 1e3, 'parts_ms': out,
            'passes': {n: c // runs for n, c in sorted(calls.items())}}


def floor(spec, counts, runs: int = 15) -> dict:
    """Median CPU ms of a graph holding only the backbone's weight matmuls (q, k, v, o, gate, up, down per layer and
    the action head), for each token count in `counts`."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    b = spec.config.backbone
    hidden, inter, layers = b['hidden_size'], b['intermediate_size'], b['num_hidden_layers']
    _, kv_heads, head_dim = spec.kv_shape
    q_out, kv_out = b['num_attention_heads'] * head_dim, kv_heads * head_dim
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], 'x'
    for i in range(layers):
        for name, k, n, src in (('q', hidden, q_out, x), ('k', hidden, kv_out, x), ('v', hidden, kv_out, x),
                                ('o', q_out, hidden, 'xq'), ('g', hidden, inter, x), ('u', hidden, inter, x),
                                ('d', inter, hidden, 'xi')):
            w = f'{name}{i}'
            inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), w))
            nodes.append(helper.make_node('MatMul', [src, w], [f'{w}_out']))
        nodes.append(helper.make_node('Add', [x, f'd{i}_out'], [f'h{i}']))
        x = f'h{i}'
    inits.append(numpy_helper.from_array(np.zeros((hidden, spec.config.n_bins), np.float32), 'head'))
    nodes.append(helper.make_node('MatMul', [x, 'head'], ['logits']))
    value = lambda name, width: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 'n', width])  # noqa: E731
    outputs = [value('logits', spec.config.n_bins)] + [helper.make_tensor_value_info(
        f'{w}{i}_out', TensorProto.FLOAT, None) for i in range(layers) for w in 'qkvogu']
    graph = helper.make_graph(nodes, 'floor', [value('x', hidden), value('xq', q_out), value('xi', inter)], outputs,
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)], ir_version=8)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=['CPUExecutionProvider'])
    times = {n: [] for n in counts}
    for r in range(runs + 2):
        for n in counts:
            feeds = {'x': np.ones((1, n, hidden), np.float32), 'xq': np.ones((1, n, q_out), np.float32),
                     'xi': np.ones((1, n, inter), np.float32)}
            c = time.thread_time()
            sess.run(['logits'], feeds)
            if r >= 2:
                times[n].append((time.thread_time() - c) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def op_types(path: str, hidden: int) -> dict:
    """{pass token count n: {op kind: share of kernel time}} from an ONNX Runtime profile file."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get('name') == 'model_run'), key=lambda e: e['ts'])
    starts = [e['ts'] for e in runs]
    import bisect

    by_run = collections.defaultdict(collections.Counter)
    width = {}
    for e in events:
        if e.get('cat') != 'Node' or not e['name'].endswith('_kernel_time'):
            continue
        i = bisect.bisect_right(starts, e['ts']) - 1
        op, shapes = e['args'].get('op_name'), [list(s.values())[0] for s in e['args'].get('input_type_shape', [])]
        if op in ('MatMul', 'FusedMatMul', 'Gemm'):
            op = 'MatMul (weights)' if len(shapes) == 1 else 'MatMul (attention)'  # prepacked weights are not listed
            if len(shapes) == 1 and len(shapes[0]) == 3 and shapes[0][2] == hidden:
                width[i] = max(width.get(i, 0), shapes[0][1])
        by_run[i][op] += e['dur']
    out = collections.defaultdict(collections.Counter)
    for i, ops in by_run.items():
        out[width.get(i, '?')].update(ops)
    return {n: {op: v / sum(ops.values()) for op, v in ops.most_common(8)} for n, ops in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folder', type=Path)
    p.add_argument('--decoder', default='blockdiff')
    p.add_argument('--runs', type=int, default=10)
    p.add_argument('--reuse', action='store_true', help="keep the instruction's K/V across chunks (the node)")
    p.add_argument('--ort-profile', action='store_true', help="add ONNX Runtime's per-op-type shares")
    p.add_argument('--no-fold', action='store_true', help='the prefill as its own pass (not folded)')
    p.add_argument('--json', type=Path)
    args = p.parse_args(argv)
    from blockvla_ros.runtime.decoding import Decoder

    spec, prefixes, engine = _open(args.folder, args.reuse)
    decoder = Decoder(spec.config, args.decoder, fold_prefill=not args.no_fold)
    acc = accounting(engine, decoder, prefixes, args.runs)
    print(f'{args.decoder} chunk: median {acc["chunk_ms"]:.1f} CPU ms, passes per chunk {acc["passes"]}')
    for part, ms in sorted(acc['parts_ms'].items(), key=lambda kv: -kv[1]):
        n = part.rsplit('=', 1)[-1]
        each = f'  ({ms / acc["passes"][int(n)]:.2f} per pass)' if part.startswith('backbone') else ''
        print(f'  {part:<32} {ms:8.2f} ms per chunk{each}')
    bottom = floor(spec, sorted(acc['passes']))
    print('weight matmuls only (floor), CPU ms per pass: ' + ', '.join(f'n={n} {v:.2f}' for n, v in bottom.items()))
    result = {'accounting': acc, 'floor_ms': bottom}
    if args.ort_profile:
        del engine  # one engine at a time (a real-size policy's weights are GBs)
        with tempfile.TemporaryDirectory() as tmp:
            _, _, prof = _open(args.folder, args.reuse, tmp)
            for i in range(args.runs):
                decoder(prof, prefixes[i % len(prefixes)])
            shares = op_types(prof.backbone.end_profiling(), spec.graphs['backbone'].tensor('embeds').shape[-1])
        for n, ops in sorted(shares.items(), key=lambda kv: str(kv[0])):
            print(f'  ORT kernel time, passes n={n}: ' + ', '.join(f'{op} {v:.0%}' for op, v in ops.items()))
        result['op_shares'] = {str(n): ops for n, ops in shares.items()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == '__main__':
    sys.exit(main())
