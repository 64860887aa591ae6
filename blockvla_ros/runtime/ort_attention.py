"""The backbone's attention cores as ONNX Runtime's `com.microsoft.GroupQueryAttention`, rewritten in memory.

Each layer of the exported backbone runs split attention (`model.split_attention`) in standard ONNX: the scores of the
queries against the cache input and against the pass's own keys, one softmax over both under the boolean mask, two
value MatMuls added, ~20 nodes per layer:

    q [1, H, n, d] -> Reshape [1, Hkv, g*n, d] -> MatMul(Transpose(past_key)) * s -> Reshape 5D --+
                                                -> MatMul(Transpose(k))         * s -> Reshape 5D --+- Concat
    Where(Not(mask), fill, .) -> Softmax -> Reshape -> Slice[:past] @ past_value + Slice[past:] @ v
    -> Reshape [1, H, n, d] -> Transpose -> Reshape [1, n, H*d] = out

`fuse_attention(model)` replaces each by one GroupQueryAttention(q, k, v as [1, n, heads*d] (q rotated in that layout
when `ort_rotary` fused its rotary); past_key_i, past_value_i;
seqlens_k = past + n - 1, total = past + n; attention_bias = Where(mask, 0, fill)) with `causal = 0` (bidirectional
blocks: the block mask is the bias) and its `present_key_i / present_value_i` outputs added to the graph. The engine
binds each present output to its past input's memory (ONNX Runtime then shares the buffer): the kernel writes the
pass's own K/V into slots [past, past + n) of that buffer and scores the queries against slots [0, past + n), so the
buffer needs n spare slots after `past` (`OrtEngine` gives the cache `spare_slots` of them) and no slot before
`past` is written. The graph's own K/V output (`new_kv`) is untouched: the engine still commits slots from it.
The last layer, whose attention the exporter restricted to the logit rows (`logit_rows`: its queries Gathered, its
output scattered back), stays as it is: GroupQueryAttention would score every query row (a prefill's 300 instead of
1), and its past inputs keep their own length (the engine binds them to a cache of T_max slots, `OrtEngine`).

Exact up to float rounding (the kernel adds the bias before its softmax; a masked score is fill + s, which
underflows exp like fill does). All-or-nothing: a graph where any other layer is not in this pattern (softcaps, sliding
windows' per-layer masks, a float16 graph, a layer reading another layer's cache) is left as it is, and so is any
graph when the ONNX Runtime's GroupQueryAttention has no `causal` attribute (older kernels are causal only, which
would be wrong here, silently). The CPU provider only (measured there; see docs/benchmarks/decode_latency.md).
"""
from __future__ import annotations

import logging

import numpy as np

from .ort_rotary import DOMAIN, _STD, _Graph, _attr, _live, _reads

log = logging.getLogger(__name__)

PRESENT = 'gqa_present_'  # present_{key,value}_i outputs are named PRESENT + 'key_3' etc.
_LAYOUT = ('Reshape', 'Transpose')  # what may sit between the value sum and the layer's output


def gqa_supported(ort) -> bool:
    """Whether this ONNX Runtime's GroupQueryAttention takes causal = 0 (a bias-masked, bidirectional pass)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        schemas = [s for s in state.get_all_operator_schema()
                   if s.name == 'GroupQueryAttention' and s.domain == DOMAIN]
    except Exception:  # noqa: BLE001 - a build without schema introspection: do not guess
        return False
    return any('causal' in s.attributes for s in schemas)


def _scalar(g: _Graph, name: str):
    t = g.consts.get(name)
    if t is None:
        return None
    a = np.asarray(g.to_array(t))
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def _only(g: _Graph, name: str, op_type: str):
    """The single default-domain consumer of `name` if it is an op_type node, else None."""
    users = g.consumers.get(name, [])
    if name in g.outputs or len(users) != 1 or users[0].op_type != op_type or users[0].domain not in _STD:
        return None
    return users[0]


def _scaled_scores(g: _Graph, matmul):
    """MatMul -> Mul(scalar) -> Reshape: -> (the Reshape, the scale) or None."""
    mul = _only(g, matmul.output[0], 'Mul')
    if mul is None:
        return None
    other = mul.input[1] if mul.input[0] == matmul.output[0] else mul.input[0]
    scale = _scalar(g, other)
    view = _only(g, mul.output[0], 'Reshape')
    return None if scale is None or view is None else (view, scale)


def _transposed_last(g: _Graph, name: str):
    """name = Transpose(x, perm [0, 1, 3, 2]) -> x."""
    node = g.op(name, 'Transpose')
    return node.input[0] if node is not None and list(_attr(node, 'perm', [])) == [0, 1, 3, 2] else None


def _mask_condition(g: _Graph, name: str, mask: str) -> bool:
    """name = Not(Unsqueeze...(mask))."""
    node = g.op(name, 'Not')
    if node is None:
        return False
    name = node.input[0]
    while name != mask:
        node = g.producer.get(name)
        if node is None or node.domain not in _STD or node.op_type != 'Unsqueeze':
            return False
        name = node.input[0]
    return True


def _match_layer(g: _Graph, past_key: str, past_value: str, mask: str):
    """-> dict(q, k, v, out, scale, fill, drop) for the layer reading past_key / past_value, or None."""
    users = [n for n in g.consumers.get(past_key, []) if n.op_type != 'Shape']
    if len(users) != 1 or users[0].op_type != 'Transpose' or list(_attr(users[0], 'perm', [])) != [0, 1, 3, 2]:
        return None
    mm_past = _only(g, users[0].output[0], 'MatMul')
    if mm_past is None or mm_past.input[1] != users[0].output[0]:
        return None
    qv = mm_past.input[0]
    q_view = g.op(qv, 'Reshape')
    if q_view is None:
        return None
    q = q_view.input[0]
    if g.op(q, 'Gather') is not None:  # the last layer, scoring the logit rows only: cheaper as it is
        return 'rows'
    mm_new = [n for n in g.consumers.get(qv, []) if n is not mm_past]
    if len(mm_new) != 1 or mm_new[0].op_type != 'MatMul' or mm_new[0].input[0] != qv:
        return None
    k = _transposed_last(g, mm_new[0].input[1])
    past, new = _scaled_scores(g, mm_past), _scaled_scores(g, mm_new[0])
    if k is None or past is None or new is None or past[1] != new[1]:
        return None
    cat = _only(g, past[0].output[0], 'Concat')
    if cat is None or list(cat.input) != [past[0].output[0], new[0].output[0]] or _attr(cat, 'axis') != -1:
        return None
    where = _only(g, cat.output[0], 'Where')
    if where is None or where.input[2] != cat.output[0] or not _mask_condition(g, where.input[0], mask):
        return None
    fill = _scalar(g, where.input[1])
    soft = _only(g, where.output[0], 'Softmax')
    view = _only(g, soft.output[0], 'Reshape') if soft is not None and _attr(soft, 'axis', -1) == -1 else None
    if fill is None or view is None:
        return None
    slices = g.consumers.get(view.output[0], [])
    if len(slices) != 2 or any(s.op_type != 'Slice' for s in slices):
        return None
    mms = [_only(g, s.output[0], 'MatMul') for s in slices]
    if any(m is None for m in mms):
        return None
    by_past = [m for m in mms if m.input[1] == past_value]
    if len(by_past) != 1 or [n.op_type for n in g.consumers.get(past_value, []) if n.op_type != 'Shape'] != ['MatMul']:
        return None
    v = [m for m in mms if m is not by_past[0]][0].input[1]
    add = _only(g, mms[0].output[0], 'Add')
    if add is None or set(add.input) != {m.output[0] for m in mms}:
        return None
    out, node = add.output[0], add
    while True:  # Reshape [1, H, n, d] -> Transpose -> (ScatterND) -> Reshape [1, n, H*d]
        users = g.consumers.get(out, [])
        if out in g.outputs or len(users) != 1 or users[0].op_type not in _LAYOUT or users[0].domain not in _STD:
            break
        node, out = users[0], users[0].output[0]
    if node.op_type != 'Reshape':
        return None
    return dict(q=q, k=k, v=v, out=out, scale=past[1], fill=fill)


def _heads(g: _Graph, name: str):
    shape = g.shapes.get(name)
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in (shape[1], shape[3])):
        return None
    return shape[1], shape[3]


def fuse_attention(model, past_names: list) -> int:
    """In place: every layer's attention core but the logit-rows layer's becomes one com.microsoft.GroupQueryAttention,
    and the graph gains the outputs PRESENT + 'key_i' / 'value_i' for those layers' cache inputs (`past_names`:
    past_key_i / past_value_i of every layer) -> how many layers were rewritten: all of those or 0 (the graph
    unchanged). `fused_layers(outputs)` reads which off the graph's outputs."""
    from onnx import ModelProto, TensorProto, helper, numpy_helper

    g = _Graph(model.graph)
    inputs = {i.name: i for i in model.graph.input}
    mask = inputs.get('mask')
    embeds = inputs.get('embeds')
    if mask is None or embeds is None or embeds.type.tensor_type.elem_type != TensorProto.FLOAT:
        return 0
    if mask.type.tensor_type.shape.dim[0].dim_value != 1:  # one mask row per sliding window: left as it is
        return 0
    layers = sorted({int(n.rsplit('_', 1)[1]) for n in past_names})
    if sorted(past_names) != sorted([f'past_key_{i}' for i in layers] + [f'past_value_{i}' for i in layers]):
        return 0
    found = {}
    for i in layers:
        m = _match_layer(g, f'past_key_{i}', f'past_value_{i}', 'mask')
        if m == 'rows':
            continue
        heads_q, heads_k = (_heads(g, m['q']), _heads(g, m['k'])) if m is not None else (None, None)
        if m is None or heads_q is None or heads_k is None or heads_q[1] != heads_k[1]:
            log.info('backbone layer %d: attention not in the split-attention pattern; no layer fused', i)
            return 0
        m['heads'], m['kv_heads'], m['head_dim'] = heads_q[0], heads_k[0], heads_q[1]
        found[i] = m
    fills = {m['fill'] for m in found.values()}
    fused_past = {f'past_{kind}_{i}' for i in found for kind in ('key', 'value')}
    readers = [n for n in model.graph.node if n.op_type == 'Shape' and n.input[0] in fused_past]
    if not found or len(fills) != 1 or any((_attr(n, 'start', 0), _attr(n, 'end', None)) != (2, 3) for n in readers):
        return 0
    original, model = model, ModelProto()
    model.CopyFrom(original)  # rewritten here, copied back once complete
    p = 'gqa_'
    init = model.graph.initializer
    init.extend([numpy_helper.from_array(np.array(0.0, np.float32), p + 'zero'),
                 numpy_helper.from_array(np.array(fills.pop(), np.float32), p + 'fill'),
                 numpy_helper.from_array(np.array(1, np.int32), p + 'one'),
                 numpy_helper.from_array(np.array([], np.int64), p + 'scalar')])
    shared = [  # once per pass: the additive mask and the lengths GroupQueryAttention reads
        helper.make_node('Where', ['mask', p + 'zero', p + 'fill'], [p + 'bias']),
        helper.make_node('Shape', ['mask'], [p + 'total64'], start=3, end=4),
        helper.make_node('Shape', ['mask'], [p + 'n64'], start=2, end=3),
        helper.make_node('Sub', [p + 'total64', p + 'n64'], [p + 'past64']),  # [1]: the cache slots the pass reads
        helper.make_node('Cast', [p + 'total64'], [p + 'total1'], to=TensorProto.INT32),
        helper.make_node('Reshape', [p + 'total1', p + 'scalar'], [p + 'total']),
        helper.make_node('Sub', [p + 'total1', p + 'one'], [p + 'seqlens']),
    ]
    nodes, replaced = [], {m['out'] for m in found.values()}
    for i, m in found.items():
        q3 = (_rotated_bsh(g, nodes, m['q'], f'{p}{i}_q', m['heads'], m['head_dim'])
              or _bsh(g, model, nodes, m['q'], f'{p}{i}_q', m['heads'] * m['head_dim']))
        k3, v3 = (_bsh(g, model, nodes, m[x], f'{p}{i}_{x}', m['kv_heads'] * m['head_dim']) for x in ('k', 'v'))
        nodes.append(helper.make_node(
            'GroupQueryAttention',
            [q3, k3, v3, f'past_key_{i}', f'past_value_{i}', p + 'seqlens', p + 'total', '', '', '', p + 'bias'],
            [m['out'], f'{PRESENT}key_{i}', f'{PRESENT}value_{i}'], domain=DOMAIN, name=f'{p}{i}',
            num_heads=m['heads'], kv_num_heads=m['kv_heads'], causal=0, scale=m['scale']))
    kept = []
    for node in model.graph.node:
        if any(o in replaced for o in node.output):
            continue  # the old core's last Reshape: its output now comes from GroupQueryAttention
        if node.op_type == 'Shape' and node.input[0] in fused_past:  # the past length: off the mask now
            kept.append(helper.make_node('Identity', [p + 'past64'], list(node.output)))
            continue
        kept.append(node)
    ordered = _topological(shared + kept + nodes, {x.name for x in model.graph.input} | {t.name for t in init})
    if ordered is None:
        return 0
    del model.graph.node[:]
    model.graph.node.extend(_live(ordered, {o.name for o in model.graph.output} | {
        f'{PRESENT}{kind}_{i}' for i in found for kind in ('key', 'value')}))
    for i, m in found.items():
        for kind in ('key', 'value'):
            model.graph.output.append(helper.make_tensor_value_info(
                f'{PRESENT}{kind}_{i}', TensorProto.FLOAT, [1, m['kv_heads'], 'slots', m['head_dim']]))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    original.CopyFrom(model)
    return len(found)


def fused_layers(output_names) -> list:
    """The layers whose attention a graph with these outputs runs as GroupQueryAttention."""
    return sorted({int(n.rsplit('_', 1)[1]) for n in output_names if n.startswith(PRESENT)})


def _rotated_bsh(g: _Graph, nodes: list, x: str, out: str, heads: int, head_dim: int):
    """x = RotaryEmbedding(Transpose(Reshape(y [1, n, heads * d]))) (`ort_rotary`'s, on q) -> the same rotary on y,
    3D (appended to nodes; the kernel reads [1, n, heads * d] with num_heads) -> out, or None. Saves q's Reshape,
    Transpose and their inverses per layer (-1 % per chunk, prefill -1 %, measured on the small shape)."""
    from onnx import helper

    r = g.producer.get(x)
    if r is None or r.op_type != 'RotaryEmbedding' or r.domain != DOMAIN:
        return None
    t = g.op(r.input[0], 'Transpose')
    y = g.op(t.input[0], 'Reshape') if t is not None and list(_attr(t, 'perm', [])) == [0, 2, 1, 3] else None
    shape = g.shapes.get(y.input[0]) if y is not None else None
    if shape is None or len(shape) != 3 or shape[-1] != heads * head_dim:
        return None
    nodes.append(helper.make_node('RotaryEmbedding', [y.input[0], *r.input[1:]], [out], domain=DOMAIN,
                                  interleaved=_attr(r, 'interleaved', 0), num_heads=heads))
    return out


def _bsh(g: _Graph, model, nodes: list, x: str, out: str, width: int) -> str:
    """x [1, heads, n, d] -> [1, n, heads * d]: the tensor x was made from (Transpose(Reshape(y [1, n, width]))),
    else a Transpose + Reshape appended to nodes (-> out)."""
    from onnx import helper, numpy_helper

    t = g.op(x, 'Transpose')
    r = g.op(t.input[0], 'Reshape') if t is not None and list(_attr(t, 'perm', [])) == [0, 2, 1, 3] else None
    if r is not None and (g.shapes.get(r.input[0]) or [None])[-1] == width and len(g.shapes[r.input[0]]) == 3:
        return r.input[0]

    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, width], np.int64), f'{out}_shape'))
    nodes.append(helper.make_node('Transpose', [x], [f'{out}_t'], perm=[0, 2, 1, 3]))
    nodes.append(helper.make_node('Reshape', [f'{out}_t', f'{out}_shape'], [out]))
    return out


def _topological(nodes: list, available: set):
    """nodes in an order where each reads only what is available or produced before it; None if impossible."""
    avail, order, pending = set(available) | {''}, [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in _reads(n)):
                order.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            return None
        pending = rest
    return order
