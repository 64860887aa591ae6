"""CPU-side checks of exported graphs: fully static shapes, and only ops in TensorRT's ONNX support list.

The support list is data (tensorrt_onnx_ops.txt next to this file, from onnx/onnx-tensorrt docs/operators.md),
so a graph that TensorRT's parser would reject is caught at export time on a machine without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OPS_FILE = Path(__file__).with_name('tensorrt_onnx_ops.txt')
ONNX_DTYPES = {1: 'float32', 7: 'int64', 9: 'bool', 10: 'float16', 6: 'int32', 11: 'float64'}


class GraphCheckError(ValueError):
    """An exported graph has a dynamic shape or an op TensorRT cannot parse."""


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


def io_specs(model) -> tuple[list, list]:
    """Graph inputs (initializers excluded) and outputs -> [{'name', 'shape', 'dtype'}]; dynamic dims raise."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for group in ([i for i in model.graph.input if i.name not in inits], list(model.graph.output)):
        specs = []
        for v in group:
            dims = _dims(v)
            if any(not isinstance(d, int) for d in dims):
                raise GraphCheckError(f'graph {model.graph.name!r}: tensor {v.name!r} has a dynamic shape {dims}')
            specs.append({'name': v.name, 'shape': dims, 'dtype': ONNX_DTYPES.get(v.type.tensor_type.elem_type,
                                                                                  'unsupported')})
        out.append(specs)
    return out[0], out[1]


def check_static_shapes(model, where: str) -> int:
    """Every graph input/output and every inferred intermediate tensor has fully static dims. -> #tensors."""
    import onnx

    try:
        io_specs(model)
    except GraphCheckError as e:
        raise GraphCheckError(f'{where}: {e}') from e
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    dynamic = []
    for v in inferred.graph.value_info:
        if v.type.HasField('tensor_type'):
            dims = _dims(v)
            if any(not isinstance(d, int) for d in dims):
                dynamic.append(f'{v.name} {dims}')
    if dynamic:
        raise GraphCheckError(f'{where}: {len(dynamic)} intermediate tensors have non-static shapes, e.g. '
                              f'{dynamic[:5]}')
    return len(inferred.graph.value_info)


def check_tensorrt_ops(model, where: str, supported: TensorRTOps | None = None) -> set:
    """All nodes (subgraphs included) use default-domain ops in the TensorRT list at a supported opset."""
    supported = supported or load_tensorrt_ops()
    opset = next((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), None)
    if opset is None or not supported.opset_min <= opset <= supported.opset_max:
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
    if bad:
        raise GraphCheckError(f'{where}: ops not in TensorRT\'s ONNX support list ({OPS_FILE.name}): {sorted(bad)}')
    return used


def check_graph_file(path: str | Path) -> dict:
    """Both checks on one exported file (external data not loaded). -> {'ops': [...], 'opset': n}."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    where = str(path)
    check_static_shapes(model, where)
    ops = check_tensorrt_ops(model, where)
    opset = next(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))
    return {'ops': sorted(ops), 'opset': opset}
