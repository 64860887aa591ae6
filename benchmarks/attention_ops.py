#!/usr/bin/env python3
"""One attention layer on ONNX Runtime (CPU): our split attention vs the com.microsoft GroupQueryAttention contrib op.

    python benchmarks/attention_ops.py [--runs 20] [--json OUT]

Answers whether an ONNX-Runtime-only graph variant with ORT's fused attention would make our passes cheaper. Both
compute one layer of the decode_latency "small" shape (8 query heads, 4 K/V heads, head_dim 64, T_max 356 cache
slots) at the pass shapes a block-diffusion chunk makes, with an arbitrary boolean mask (block-causal inside a pass
is just a pattern of it):

    ours   model.split_attention exported alone (torch.export, opset 20): cache and new tokens scored separately,
           one softmax; it reads `past` cache slots (T_max on action passes, 1 in a one-call prefill)
    gqa    GroupQueryAttention with causal=0 (bidirectional), the mask as attention_bias (0 / -inf), past and present
           bound to the same cache buffer (the new K/V are written into it in place); it scores only the
           past + n columns it is told are filled

The GQA output is checked against a numpy reference before it is timed. Medians of the thread's CPU time, 1 intra-op
thread; printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

HEADS, KV_HEADS, HEAD_DIM, T_MAX, PREFIX = 8, 4, 64, 356, 300
CASES = {'prefill (n = 300)': (0, 300), 'AR (n = 1)': (PREFIX, 1), 'refine (n = 8)': (PREFIX, 8),
         'commit + refine (n = 16)': (PREFIX, 16)}  # name -> (filled cache slots, new tokens)


def _session(model_or_path, ort):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    src = model_or_path.SerializeToString() if hasattr(model_or_path, 'SerializeToString') else str(model_or_path)
    return ort.InferenceSession(src, so, providers=['CPUExecutionProvider'])


def _cpu_ms(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        c = time.thread_time()
        fn()
        times.append((time.thread_time() - c) * 1e3)
    return statistics.median(times)


def ours(past_slots: int, n: int, work: Path, ort, runs: int) -> float:
    """Our split attention over `past_slots` cache slots + n new tokens."""
    import torch

    from blockvla_ros.model.split_attention import SplitCache, split_attention

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, past_k, past_v, mask):
            layer = types.SimpleNamespace(layer_idx=0)
            return split_attention(layer, q, k, v, mask, split_cache=SplitCache([(past_k, past_v)]))[0]

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, HEADS, n, HEAD_DIM, generator=g), torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g),
            torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g),
            torch.randn(1, KV_HEADS, past_slots, HEAD_DIM, generator=g),
            torch.randn(1, KV_HEADS, past_slots, HEAD_DIM, generator=g),
            torch.rand(1, 1, n, past_slots + n, generator=g) > 0.3)
    path = work / f'split_{past_slots}_{n}.onnx'
    torch.onnx.export(Layer(), args, str(path), dynamo=True, opset_version=20, verbose=False)
    sess = _session(path, ort)
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    return _cpu_ms(lambda: sess.run(None, feeds), runs)


def gqa_model():
    from onnx import TensorProto as TP
    from onnx import helper

    def f(name, shape, t=TP.FLOAT):
        return helper.make_tensor_value_info(name, t, shape)

    node = helper.make_node('GroupQueryAttention', ['q', 'k', 'v', 'past_k', 'past_v', 'seqlens_k', 'total', '', '',
                                                    '', 'bias'], ['out', 'present_k', 'present_v'],
                            domain='com.microsoft', num_heads=HEADS, kv_num_heads=KV_HEADS, causal=0)
    cache = [1, KV_HEADS, T_MAX, HEAD_DIM]
    graph = helper.make_graph(
        [node], 'gqa', [f('q', [1, 'n', HEADS * HEAD_DIM]), f('k', [1, 'n', KV_HEADS * HEAD_DIM]),
                        f('v', [1, 'n', KV_HEADS * HEAD_DIM]), f('past_k', cache), f('past_v', cache),
                        f('seqlens_k', [1], TP.INT32), f('total', [], TP.INT32), f('bias', [1, 1, 'n', 'total'])],
        [f('out', [1, 'n', HEADS * HEAD_DIM]), f('present_k', cache), f('present_v', cache)])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid('', 20),
                                                                  helper.make_opsetid('com.microsoft', 1)])


def gqa(sess, past: int, n: int, ort, runs: int) -> tuple:
    """GQA over `past` filled slots + n new tokens. -> (CPU ms, max |out - numpy reference|)."""
    rng = np.random.default_rng(past * 1000 + n)
    kc, vc = (rng.normal(size=(1, KV_HEADS, T_MAX, HEAD_DIM)).astype(np.float32) for _ in range(2))
    q = rng.normal(size=(1, n, HEADS * HEAD_DIM)).astype(np.float32)
    k, v = (rng.normal(size=(1, n, KV_HEADS * HEAD_DIM)).astype(np.float32) for _ in range(2))
    mask = rng.random((n, past + n)) > 0.3
    mask[:, past:] |= np.eye(n, dtype=bool)
    bias = np.where(mask, 0.0, -np.inf).astype(np.float32)[None, None]  # [1, 1, n, past + n]
    g = HEADS // KV_HEADS
    keys = np.concatenate([kc[0, :, :past], k[0].reshape(n, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)], 1)
    values = np.concatenate([vc[0, :, :past], v[0].reshape(n, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)], 1)
    queries = q[0].reshape(n, HEADS, HEAD_DIM).transpose(1, 0, 2)  # [H, n, d]
    s = np.einsum('hnd,htd->hnt', queries, np.repeat(keys, g, 0)) / np.sqrt(HEAD_DIM) + bias[0]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum('hnt,htd->nhd', p, np.repeat(values, g, 0)).reshape(n, HEADS * HEAD_DIM)
    binding = sess.io_binding()
    for name, arr in (('q', q), ('k', k), ('v', v), ('bias', bias), ('seqlens_k', np.array([past + n - 1], np.int32)),
                      ('total', np.array(past + n, np.int32))):
        binding.bind_cpu_input(name, arr)
    for inp, outp, buf in (('past_k', 'present_k', kc), ('past_v', 'present_v', vc)):  # one buffer: in place
        value = ort.OrtValue.ortvalue_from_numpy(buf)
        binding.bind_ortvalue_input(inp, value)
        binding.bind_ortvalue_output(outp, value)
    out = np.zeros((1, n, HEADS * HEAD_DIM), np.float32)
    binding.bind_ortvalue_output('out', ort.OrtValue.ortvalue_from_numpy(out))
    sess.run_with_iobinding(binding)
    err = float(np.abs(out[0] - ref).max())
    return _cpu_ms(lambda: sess.run_with_iobinding(binding), runs), err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', type=int, default=20)
    p.add_argument('--json', type=Path)
    args = p.parse_args(argv)
    import onnxruntime as ort
    import torch

    torch.set_num_threads(1)
    sess = _session(gqa_model(), ort)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (past, n) in CASES.items():
            reads = 1 if past == 0 else T_MAX  # what our runtime binds: 1 slot in a one-call prefill, else T_max
            row = {'ours_ms': ours(reads, n, Path(tmp), ort, args.runs)}
            if past == 0:  # before the dynamic past length: every pass read all T_max slots
                row['ours_all_slots_ms'] = ours(T_MAX, n, Path(tmp), ort, args.runs)
            row['gqa_ms'], row['gqa_max_abs_err'] = gqa(sess, past, n, ort, args.runs)
            rows[name] = row
            print(f'{name:<26} ours {row["ours_ms"]:7.3f} ms' + (
                f' (all {T_MAX} slots: {row["ours_all_slots_ms"]:.3f})' if 'ours_all_slots_ms' in row else '') +
                f'   GroupQueryAttention {row["gqa_ms"]:7.3f} ms (max |err| {row["gqa_max_abs_err"]:.1e})',
                flush=True)
    if args.json:
        args.json.write_text(json.dumps({'onnxruntime': ort.__version__, 'runs': args.runs, 'cases': rows}, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
