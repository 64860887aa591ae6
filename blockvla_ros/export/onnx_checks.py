"""CPU-side checks of exported graphs: shapes dynamic only in the token count n and the cache slots read (past), and
only ops in TensorRT's ONNX support list.

The support list is data (tensorrt_onnx_ops.txt next to this file, from onnx/onnx-tensorrt docs/operators.md),
so a graph that TensorRT's parser would reject is caught at export time on a machine without a GPU. A graph's
inputs and outputs have static dims or expressions of the symbols it declares (the backbone: 'n', 'past', 'm' and
'n + past'); the TensorRT optimization profiles (runtime.tensorrt_profiles) give every such input a range.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

OPS_FILE = Path(__file__).with_name('tensorrt_onnx_ops.txt')
ONNX_DTYPES = {1: 'float32', 7: 'int64', 9: 'bool', 10: 'float16', 6: 'int32', 11: 'float64'}


class GraphCheckError(ValueError):
    """An exported graph has an unexpected dynamic shape or an op TensorRT cannot parse."""


@dataclass(frozen=True)
class TensorRTOps:
    ops: frozenset
    opset_min: int
    opset_max: int


def load_tensorrt_ops(path: str | Path = OPS_FILE) -> TensorRTOps:
    ops, meta = set(), {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        if line.startswith('@'):
            key, value = line[1:].split()
            meta[key] = int(value)
        else:
            ops.add(line)
    return TensorRTOps(frozenset(ops), meta.get('opset_min', 1), meta.get('opset_max', 1 << 30))


def _dims(value_info) -> list:
    t = value_info.type.tensor_type
    if not t.HasField('shape'):
        return [None]
    return [d.dim_value if d.HasField('dim_value') and d.dim_value >= 0 else (d.dim_param or None)
            for d in t.shape.dim]


def symbols(dim) -> set:
    """The free symbols of one dimension: {} for an int, {'n'} for 'n' or 'n + 356'."""
    return set() if isinstance(dim, int) else set(re.findall(r'[A-Za-z_]\w*', str(dim)))


def io_specs(model, dynamic: tuple = ('n', 'past', 'm')) -> tuple[list, list]:
    """Graph inputs (initializers excluded) and outputs -> [{'name', 'shape', 'dtype'}]; a dim is an int or an
    expression of the `dynamic` symbols (a string), anything else raises GraphCheckError."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for group in ([i for i in model.graph.input if i.name not in inits], list(model.graph.output)):
        specs = []
        for v in group:
            dims = _dims(v)
            if any(d is None or not symbols(d) <= set(dynamic) for d in dims):
                raise GraphCheckError(f'graph {model.graph.name!r}: tensor {v.name!r} has dims {dims}; only '
                                      f'{list(dynamic)} may vary')
            specs.append({'name': v.name, 'shape': dims, 'dtype': ONNX_DTYPES.get(v.type.tensor_type.elem_type,
                                                                                  'unsupported')})
        out.append(specs)
    return out[0], out[1]


def check_tensorrt_ops(model, where: str, supported: TensorRTOps | None = None, enforce: bool = True) -> set:
    """All nodes (subgraphs included) use default-domain ops in the TensorRT list at a supported opset.

    -> the ops used; with enforce=False they are only collected (a graph meant for ONNX Runtime only)."""
    supported = supported or load_tensorrt_ops()
    opset = next((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), None)
    if enforce and (opset is None or not supported.opset_min <= opset <= supported.opset_max):
        raise GraphCheckError(f'{where}: opset {opset} is outside what TensorRT parses '
                              f'({supported.opset_min}-{supported.opset_max})')
    used, bad = set(), set()

    def visit(graph):
        for node in graph.node:
            name = node.op_type if node.domain in ('', 'ai.onnx') else f'{node.domain}::{node.op_type}'
            used.add(name)
            if name not in supported.ops:
                bad.add(name)
            for attr in node.attribute:
                if attr.g.node:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    if bad and enforce:
        raise GraphCheckError(f'{where}: ops not in TensorRT\'s ONNX support list ({OPS_FILE.name}): {sorted(bad)}')
    return used


def check_graph_file(path: str | Path, dynamic: tuple = ('n', 'past', 'm'), tensorrt: bool = True) -> dict:
    """Both checks on one exported file (its weights not loaded, inline or external: export.onnx_inline; tensorrt=False:
    the op list is only recorded).

    -> {'ops': [...], 'opset': n, 'dynamic': [...], 'tensorrt': bool}."""
    from .onnx_inline import load_without_weights

    model = load_without_weights(path)
    where = str(path)
    try:
        ins, outs = io_specs(model, dynamic)
    except GraphCheckError as e:
        raise GraphCheckError(f'{where}: {e}') from e
    ops = check_tensorrt_ops(model, where, enforce=tensorrt)
    opset = next(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))
    used = sorted(set().union(*(symbols(d) for t in ins + outs for d in t['shape'])))
    return {'ops': sorted(ops), 'opset': opset, 'dynamic': used, 'tensorrt': tensorrt}
