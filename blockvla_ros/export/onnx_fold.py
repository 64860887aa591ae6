"""Fold shape arithmetic into constants, so ONNX shape inference sees every intermediate shape as static.

The TorchScript exporter computes some shapes at run time from constants (e.g. `expand` becomes
Where(Equal(shape, -1), 1, shape)) and from Shape() of tensors whose shape is in fact fixed. With static
inputs those values are constants: evaluate each such node once (onnx's reference evaluator) and replace it
by a Constant. Only small initializers (shape-like, <= MAX_INIT_ELEMENTS) feed a fold, so weights are never
touched; folded results up to MAX_ELEMENTS (e.g. a constant bool mask) become Constant nodes. This also removes
ops ONNX Runtime lacks kernels for (EyeLike on bool, emitted for `torch.eye(..., dtype=bool)`).
"""
from __future__ import annotations

import numpy as np

MAX_INIT_ELEMENTS = 4096
MAX_ELEMENTS = 1 << 20
NOT_FOLDABLE = {'RandomNormal', 'RandomNormalLike', 'RandomUniform', 'RandomUniformLike', 'Multinomial',
                'Bernoulli', 'If', 'Loop', 'Scan'}


def _static_shapes(model) -> dict:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        if v.type.HasField('tensor_type') and t.HasField('shape'):
            dims = [d.dim_value if d.HasField('dim_value') else None for d in t.shape.dim]
            if all(d is not None for d in dims):
                out[v.name] = dims
    return out


def _shape_of(node, shape: list) -> np.ndarray:
    attrs = {a.name: a.i for a in node.attribute}
    rank = len(shape)
    start, end = attrs.get('start', 0), attrs.get('end', rank)
    return np.asarray(shape, dtype=np.int64)[slice(start, end)]


def fold_constants(model, max_passes: int = 4):
    """-> the same model with foldable shape computations replaced by Constant nodes (in place)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    opset = next((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), 18)
    for _ in range(max_passes):
        shapes = _static_shapes(model)
        consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
                  if int(np.prod(i.dims, dtype=np.int64)) <= MAX_INIT_ELEMENTS
                  and i.data_location != onnx.TensorProto.EXTERNAL}
        nodes, changed = [], False
        for node in model.graph.node:
            values = None
            has_subgraph = any(a.g.node or a.graphs for a in node.attribute)
            if node.domain not in ('', 'ai.onnx') or node.op_type in NOT_FOLDABLE or has_subgraph:
                pass
            elif node.op_type == 'Shape' and node.input[0] in shapes:
                values = [_shape_of(node, shapes[node.input[0]])]
            elif all(i == '' or i in consts for i in node.input):
                feeds = {i: consts[i] for i in node.input if i}
                values = ReferenceEvaluator(node, opsets={'': opset}).run(None, feeds)
            if values is not None and all(np.asarray(v).size <= MAX_ELEMENTS for v in values):
                for name, v in zip(node.output, values):
                    v = np.asarray(v)
                    consts[name] = v
                    nodes.append(node if node.op_type == 'Constant' else
                                 helper.make_node('Constant', [], [name], value=numpy_helper.from_array(v, name)))
                changed |= node.op_type != 'Constant'
            else:
                nodes.append(node)
        del model.graph.node[:]
        model.graph.node.extend(_live(nodes, model))
        if not changed:
            break
    return model


def _live(nodes: list, model) -> list:
    """Drop nodes whose outputs nobody reads (folded-away shape chains)."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # names read inside subgraphs
                for g in ([a.g] if a.g.node else []) + list(a.graphs):
                    needed.update(i for n in g.node for i in n.input)
    return keep[::-1]
