"""The backbone's rotary embeddings as ONNX Runtime's `com.microsoft.RotaryEmbedding`, rewritten in memory.

The exported backbone applies HF's apply_rotary_pos_emb to q and k of every layer in standard ONNX (opset <= 20 has
no rotary op, and TensorRT 10.0-10.3 parses none), 7 nodes per tensor:

    x [1, heads, n, D] ------------------------------------------ Mul(cos4) --+
     |-- Slice[..., h:] -- Neg --+                                              Add -> x rotated
     '-- Slice[..., :h] ---------+-- Concat(axis -1) ------------ Mul(sin4) --+
    cos4 = Unsqueeze(cos, 1), cos = [c *] Cos(Concat(f, f, axis -1)), f [1, n, h] = positions x inv_freq; sin alike

`fuse_rotary(model)` replaces each such group by one RotaryEmbedding(x, position_ids=[0], cos[0, :, :h],
sin[0, :, :h]), non-interleaved, its 4D input read as [batch, heads, n, D] (ONNX Runtime >= 1.17): cos_cache row s
is token s's cos, so the offset form of position_ids (0) indexes it. Exact up to float rounding: the kernel computes
x1 cos - x2 sin and x2 cos + x1 sin from the same products; the two halves of cos and sin are equal because both
come from Concat(f, f), which the matcher checks. The small benchmark backbone (8 layers) goes from 652 to 558
nodes, 519 to 431 after ONNX Runtime's own optimizations.

The policy folder keeps the standard graph (TensorRT, the static checks, one copy of each weight on disk); the ONNX
Runtime engine rewrites the graph proto only (weights in a .data file stay there: the session reads them from the
folder, see `OrtEngine`). A graph without the pattern (another exporter, a partial rotary) is left as it is.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

DOMAIN = 'com.microsoft'
_STD = ('', 'ai.onnx')


class _Graph:
    """Lookups over one graph: producers, consumers, constant int tensors, static shapes."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers = {}
        for n in graph.node:
            for name in _reads(n):
                self.consumers.setdefault(name, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.consts = {t.name: t for t in graph.initializer if not t.data_location}  # inline only
        for n in graph.node:
            if n.op_type == 'Constant' and n.domain in _STD and n.attribute and n.attribute[0].name == 'value':
                self.consts[n.output[0]] = n.attribute[0].t
        self.to_array = numpy_helper.to_array
        self.shapes = {}
        for v in list(graph.value_info) + list(graph.input) + list(graph.output):
            dims = v.type.tensor_type.shape.dim
            self.shapes[v.name] = [d.dim_value if d.HasField('dim_value') else d.dim_param for d in dims]

    def op(self, name: str, op_type: str):
        """The default-domain node of type op_type that produces `name`, or None."""
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op_type and n.domain in _STD else None

    def ints(self, name: str):
        t = self.consts.get(name)
        return None if t is None else [int(v) for v in np.asarray(self.to_array(t)).reshape(-1)]

    def only_used_by(self, name: str, node) -> bool:
        users = self.consumers.get(name, [])
        return name not in self.outputs and len(users) == 1 and users[0] is node


def _reads(node) -> list:
    """The names a node reads: its inputs and those its subgraphs (If / Loop / Scan bodies) read."""
    names = list(node.input)
    for a in node.attribute:
        for sub in ([a.g] if a.HasField('g') else []) + list(a.graphs):
            names += [name for n in sub.node for name in _reads(n)]
    return names


def _attr(node, name: str, default=None):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _slice(g: _Graph, node, x: str, start: int, end_min: int, end_max: int) -> bool:
    """node is Slice(x)[..., start:end] on the last axis of a rank-4 x, step 1, end_min <= end <= end_max."""
    if node is None or node.input[0] != x or len(node.input) < 4:
        return False
    starts, ends, axes = (g.ints(i) for i in node.input[1:4])
    steps = g.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
    return (starts == [start] and ends is not None and len(ends) == 1 and end_min <= ends[0] <= end_max
            and axes in ([-1], [3]) and steps == [1])


def _half_source(g: _Graph, name: str, trig: str):
    """name = [scalar *] trig(Concat(f, f, axis -1)) -> (the Concat's output, the scale's input name or None)."""
    scale = None
    mul = g.op(name, 'Mul')
    if mul is not None:
        a, b = mul.input
        const = b if b in g.consts else a if a in g.consts else None
        if const is None or g.to_array(g.consts[const]).size != 1:
            return None
        scale, name = const, (a if const == b else b)
    node = g.op(name, trig)
    cat = g.op(node.input[0], 'Concat') if node is not None else None
    if cat is None or len(cat.input) != 2 or cat.input[0] != cat.input[1] or _attr(cat, 'axis') not in (-1, 2):
        return None
    return cat.output[0], scale


def _match(g: _Graph, add):
    """add = x * cos4 + rotate_half(x) * sin4 -> (x, cos, sin, h, nodes to drop) or None."""
    if add.op_type != 'Add' or add.domain not in _STD or len(add.input) != 2:
        return None
    for first, second in ((0, 1), (1, 0)):
        mul_c, mul_s = g.op(add.input[first], 'Mul'), g.op(add.input[second], 'Mul')
        if mul_c is None or mul_s is None:
            continue
        for x, cos4 in (mul_c.input, mul_c.input[::-1]):
            for rot, sin4 in (mul_s.input, mul_s.input[::-1]):
                found = _match_halves(g, x, rot)
                cos, sin = _unsqueezed(g, cos4), _unsqueezed(g, sin4)
                if found is None or cos is None or sin is None:
                    continue
                h, nodes = found
                if (g.only_used_by(mul_c.output[0], add) and g.only_used_by(mul_s.output[0], add)
                        and g.only_used_by(rot, mul_s) and _shapes_ok(g, x, cos, sin, h)):
                    return x, cos, sin, h, nodes + [mul_c, mul_s]
    return None


def _match_halves(g: _Graph, x: str, rot: str):
    """rot = Concat(Neg(x[..., h:]), x[..., :h], axis -1) -> (h, [second slice, neg, first slice, concat])."""
    cat = g.op(rot, 'Concat')
    if cat is None or len(cat.input) != 2 or _attr(cat, 'axis') not in (-1, 3):
        return None
    neg, low = g.op(cat.input[0], 'Neg'), g.op(cat.input[1], 'Slice')
    high = g.op(neg.input[0], 'Slice') if neg is not None else None
    if low is None or high is None:
        return None
    h = g.ints(low.input[2]) if len(low.input) > 2 else None
    if not h or h[0] <= 0 or not _slice(g, low, x, 0, h[0], h[0]) or not _slice(g, high, x, h[0], 2 * h[0], 2 ** 63):
        return None
    if not (g.only_used_by(high.output[0], neg) and g.only_used_by(neg.output[0], cat)
            and g.only_used_by(low.output[0], cat)):
        return None
    return h[0], [high, neg, low, cat]


def _unsqueezed(g: _Graph, name: str):
    """name = Unsqueeze(src, axes=[1]) -> src."""
    node = g.op(name, 'Unsqueeze')
    if node is None or len(node.input) != 2 or g.ints(node.input[1]) != [1]:
        return None
    return node.input[0]


def _shapes_ok(g: _Graph, x: str, cos: str, sin: str, h: int) -> bool:
    """x is [batch, heads, n, 2h] and cos / sin [1, n, 2h] with both halves from one Concat(f, f)."""
    xs, cs, ss = g.shapes.get(x), g.shapes.get(cos), g.shapes.get(sin)
    if xs is None or len(xs) != 4 or xs[3] != 2 * h or cs is None or cs != ss or len(cs) != 3 or cs[0] != 1 \
            or cs[2] != 2 * h:
        return False
    c, s = _half_source(g, cos, 'Cos'), _half_source(g, sin, 'Sin')
    return c is not None and s is not None and c == s


def fuse_rotary(model) -> int:
    """In place: every rotary group of `model.graph` becomes one com.microsoft.RotaryEmbedding (the graph's other
    nodes and its weights untouched). -> how many groups were rewritten (0: the graph is unchanged)."""
    from onnx import helper, numpy_helper

    g = _Graph(model.graph)
    found = {}  # id(add) -> match
    for node in model.graph.node:
        m = _match(g, node)
        if m is not None:
            found[id(node)] = m
    if not found:
        return 0
    dropped = {id(n) for m in found.values() for n in m[4]}
    caches, nodes = {}, []
    prefix = _fresh_prefix(g)
    zero = f'{prefix}_position_offset'
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.int64), zero))
    for node in model.graph.node:
        if id(node) in dropped:
            continue
        if id(node) not in found:
            nodes.append(node)
            continue
        x, cos, sin, h, _ = found[id(node)]
        names = []
        for src in (cos, sin):
            if (src, h) not in caches:  # [1, n, 2h] -> [n, h], once per graph
                caches[(src, h)] = _half_cache(model, nodes, src, h, f'{prefix}_cache_{len(caches)}')
            names.append(caches[(src, h)])
        nodes.append(helper.make_node('RotaryEmbedding', [x, zero, *names], [node.output[0]], domain=DOMAIN,
                                      name=f'{node.name or node.output[0]}_rotary', interleaved=0))
    del model.graph.node[:]
    model.graph.node.extend(_live(nodes, {o.name for o in model.graph.output}))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(found)


def _half_cache(model, nodes: list, src: str, h: int, out: str) -> str:
    """Appends Slice(src)[0, :, :h] (as Slice + Squeeze) to nodes -> the [n, h] cache's name (out)."""
    from onnx import helper, numpy_helper

    for suffix, value in (('starts', 0), ('ends', h), ('axes', 2), ('squeeze', 0)):
        model.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), f'{out}_{suffix}'))
    nodes.append(helper.make_node('Slice', [src, f'{out}_starts', f'{out}_ends', f'{out}_axes'], [f'{out}_half']))
    nodes.append(helper.make_node('Squeeze', [f'{out}_half', f'{out}_squeeze'], [out]))  # [1, n, h] -> [n, h]
    return out


def _fresh_prefix(g: _Graph) -> str:
    """A name prefix no tensor of the graph starts with."""
    names = set(g.producer) | set(g.consumers) | {t.name for t in g.graph.initializer}
    k = 0
    while any(n.startswith(f'rotary{k}_') for n in names):
        k += 1
    return f'rotary{k}'


def _live(nodes: list, outputs: set) -> list:
    """nodes without the ones a rewrite left unread (here the per-layer Unsqueeze of cos / sin; in ort_attention the
    old attention cores and a fused layer's 4-D q rotary): nodes, of any domain, none of whose outputs is read or is a
    graph output, repeatedly."""
    while True:
        read = {name for n in nodes for name in _reads(n)} | outputs
        kept = [n for n in nodes if any(o in read for o in n.output if o)]
        if len(kept) == len(nodes):
            return nodes
        nodes = kept


def fused_backbone(path, rotary: bool = True, attention_past=None) -> tuple:
    """The graph at `path` with its rotary groups fused and, given the cache input names `attention_past`, its
    attention cores (`runtime.ort_attention`), serialized, for an ONNX Runtime session whose external data folder is
    path's (the weights are not read here) -> (model bytes or None when nothing was fused, rotary groups fused,
    attention layers fused). Without the onnx package, or without the patterns, None: the caller opens the graph as
    exported."""
    try:
        import onnx
    except ImportError:
        log.warning('%s: the onnx package is not installed, so the rotary embeddings and attention run as exported '
                    '(7 nodes per q / k instead of one RotaryEmbedding): pip install onnx', path)
        return None, 0, 0
    try:
        model = onnx.load(str(path), load_external_data=False)
        count = fuse_rotary(model) if rotary else 0
        layers = 0
        if attention_past:
            from .ort_attention import fuse_attention

            layers = fuse_attention(model, list(attention_past))
    except Exception as e:  # noqa: BLE001 - whatever onnx cannot read, ONNX Runtime reports on the plain graph
        log.warning('%s: not rewritten (%s: %s); the graph runs as exported', path, type(e).__name__, e)
        return None, 0, 0
    if rotary and not count:
        log.info('%s: no rotary embedding in the pattern of HF apply_rotary_pos_emb; they run as exported', path)
    if not count and not layers:
        return None, 0, 0
    log.info('%s: %d rotary embeddings run as com.microsoft.RotaryEmbedding, %d attention layers as '
             'com.microsoft.GroupQueryAttention', path, count, layers)
    return model.SerializeToString(), count, layers
