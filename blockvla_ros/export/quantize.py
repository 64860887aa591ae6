"""Weight-only MatMulNBits quantization of an ONNX graph, one weight at a time (no whole-graph copy in memory).

    data = quantize_graph('tmp/backbone.onnx', bits=4, block_size=32, accuracy_level=4)  # -> ['backbone.onnx.data']

Every MatMul whose second input is a stored 2-D fp32 weight [K, N] becomes a com.microsoft MatMulNBits node (ONNX
Runtime's contrib op): B packed to uint8 [N, ceil(K / block), block * bits / 8], one fp32 scale per block
[N, ceil(K / block)], symmetric (no zero points), attributes K, N, bits, block_size (+ accuracy_level when not 0).
The blocks are quantized by the same ONNX Runtime kernels (quantize_matmul_4bits / _8bits) as
onnxruntime.quantization's MatMulNBitsQuantizer with DefaultWeightOnlyQuantConfig(is_symmetric=True), under the
same names (`<B>_Q<bits>`, `<B>_scales`, node `<name>_Q<bits>`), so the graph is the one that quantizer writes.
What differs is memory: that quantizer needs the whole fp32 graph loaded (`onnx.load`) plus its own copies (1.76 GB
peak for the 0.5B's 1.43 GB fp32 graph, measured alone); here the graph is read without its weights, each MatMul
weight is read from the external-data file (or the inline bytes) at its offset, quantized and appended to a new
external-data file at once, so the peak is one fp32 weight matrix plus its quantized form (83 MB at 0.5B). The
output always keeps its weights in that file, however small: ONNX Runtime holds an inline quantized graph's weights
about twice (export.precision.quantize_weights).

accuracy_level (the MatMulNBits attribute): the minimum precision ONNX Runtime may compute in. 0 = unset (the
kernel's default: fp32 on dequantized weights), 1 = fp32, 2 = fp16, 3 = bf16, 4 = int8 (activations quantized to
int8 per block, integer dot products: the fast path on x86 with AVX2 / AVX-512 VNNI and on ARM).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # unset, fp32, fp16, bf16, int8 (MatMulNBits' accuracy_level)
INLINE_BYTES = 1024  # tensors below this stay inside the .onnx file (onnx.save_model's size_threshold)
ALIGN_BYTES = 4096  # large tensors start on a page boundary in the data file (lets a runtime map them)
ALIGN_FROM = 1 << 20


def check_accuracy_level(level) -> int:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or int(level) not in ACCURACY_LEVELS:
        raise ValueError(f'accuracy_level must be one of {ACCURACY_LEVELS} (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 '
                         f'compute), got {level!r}')
    return int(level)


def check_block_size(block_size, what: str = 'block_size') -> int:
    """MatMulNBits' block_size: a power of two >= 16 (ONNX Runtime's rule). ValueError naming `what` otherwise."""
    from ..runtime.tables import check_group

    return check_group(block_size, what)


def quantize_graph(path, bits: int, block_size: int, accuracy_level: int) -> list:
    """Rewrite graph `path` in place with weight-only MatMulNBits. -> its external-data file names: [`<file>.data`],
    one file holding every weight of the graph (replacing any there was)."""
    import onnx

    if bits not in (4, 8):
        raise ValueError(f'bits must be 4 or 8, got {bits!r}')
    accuracy_level = check_accuracy_level(accuracy_level)
    block_size = check_block_size(block_size)
    path = Path(path)
    data = path.with_name(path.name + '.data')
    model = onnx.load(str(path), load_external_data=False)  # the graph and its small inline tensors only
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ValueError(f'{path}: a graph with subgraphs (If / Loop / Scan) is not supported by the weight quantizer')
    initializers = {t.name: t for t in graph.initializer}
    partial = data.with_name(data.name + '.partial')
    with _DataWriter(partial) as writer, _TensorReader(path.parent) as reader:
        nodes, added, done = [], [], {}
        for node in graph.node:
            weight = initializers.get(node.input[1]) if node.op_type == 'MatMul' and len(node.input) == 2 else None
            if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
                nodes.append(node)
                continue
            if weight.name not in done:
                packed, scales = quantize_matrix(reader.read(weight), bits, block_size)
                done[weight.name] = (writer.add(f'{weight.name}_Q{bits}', packed),
                                     writer.add(f'{weight.name}_scales', scales))
                added.extend(done[weight.name])
            k, n = weight.dims
            attrs = dict(K=k, N=n, bits=bits, block_size=block_size)
            if accuracy_level:  # 0 = unset: left out, as ONNX Runtime's quantizer does
                attrs['accuracy_level'] = accuracy_level
            nodes.append(onnx.helper.make_node(
                'MatMulNBits', [node.input[0]] + [t.name for t in done[weight.name]], list(node.output),
                name=f'{node.name}_Q{bits}' if node.name else '', domain='com.microsoft', **attrs))
        used = {i for node in nodes for i in node.input} | {o.name for o in graph.output}
        kept = [writer.copy(t, reader) for t in graph.initializer if t.name in used]  # unused ones dropped
        total = writer.total
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    _set_opset(model, 'com.microsoft', 1)
    log.info('quantized %d MatMul weights of %s to %d bits (block %d, accuracy_level %d): %.1f MB of weights',
             len(done), path.name, bits, block_size, accuracy_level, total / 1e6)
    os.replace(partial, data)  # the old fp32 data is no longer referenced
    onnx.save_model(model, str(path))  # the graph alone: its tensors already point into `data`
    return [data.name]


def quantize_matrix(weight: np.ndarray, bits: int, block_size: int) -> tuple:
    """fp32 [K, N] -> (packed uint8 [N, k_blocks, block * bits / 8], scales fp32 [N, k_blocks]), symmetric blocks of
    `block_size` along K, by ONNX Runtime's own kernels (those of its MatMulNBitsQuantizer)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = weight.shape  # K, N
    k_blocks = (rows + block_size - 1) // block_size
    if k_blocks * block_size != rows:  # padded with zeros along K, as that quantizer does
        weight = np.pad(weight, ((0, k_blocks * block_size - rows), (0, 0)))
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    per_byte = 8 // bits
    packed = np.zeros((cols, k_blocks, (block_size + per_byte - 1) // per_byte), dtype=np.uint8)
    zero_points = np.zeros((cols, (k_blocks + per_byte - 1) // per_byte), dtype=np.uint8)  # unused: symmetric
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    kernel = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    kernel(packed, weight, scales, zero_points, block_size, cols, rows, True)
    return packed, scales


class _TensorReader:
    """Reads one initializer at a time, from its inline bytes or its external-data file (files kept open)."""

    def __init__(self, folder: Path):
        self.folder, self.files = Path(folder), {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self.files.values():
            f.close()

    def raw(self, tensor) -> bytes:
        import onnx

        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return onnx.numpy_helper.to_array(tensor).tobytes() if not tensor.HasField('raw_data') else \
                tensor.raw_data
        info = {e.key: e.value for e in tensor.external_data}
        name = info['location']
        if Path(name).name != name:
            raise ValueError(f'tensor {tensor.name}: external data outside the graph\'s folder ({name!r})')
        if name not in self.files:
            self.files[name] = open(self.folder / name, 'rb')
        f = self.files[name]
        f.seek(int(info.get('offset', 0)))
        length = int(info['length']) if 'length' in info else None
        raw = f.read(length) if length is not None else f.read()
        if length is not None and len(raw) != length:
            raise ValueError(f'tensor {tensor.name}: {name} ends before its {length} bytes')
        return raw

    def read(self, tensor) -> np.ndarray:
        """An fp32 tensor as a numpy array of its dims (a fresh buffer: no map of the file is kept)."""
        return np.frombuffer(self.raw(tensor), dtype=np.float32).reshape(tuple(tensor.dims))


class _DataWriter:
    """Appends tensors to one new external-data file; tensors under INLINE_BYTES stay inline."""

    def __init__(self, path: Path):
        self.path, self.total = Path(path), 0

    def __enter__(self):
        self.file = open(self.path, 'wb')
        return self

    def __exit__(self, exc_type, *exc):
        self.file.close()
        if exc_type is not None:
            self.path.unlink(missing_ok=True)

    def _store(self, tensor, raw: bytes):
        import onnx

        self.total += len(raw)
        if len(raw) < INLINE_BYTES:
            tensor.raw_data = raw
            return tensor
        offset = self.file.tell()
        if len(raw) >= ALIGN_FROM and offset % ALIGN_BYTES:
            self.file.write(b'\0' * (ALIGN_BYTES - offset % ALIGN_BYTES))
            offset = self.file.tell()
        self.file.write(raw)
        tensor.ClearField('raw_data')
        del tensor.external_data[:]
        for key, value in (('location', self.path.name.removesuffix('.partial')), ('offset', offset),
                           ('length', len(raw))):
            tensor.external_data.add(key=key, value=str(value))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        return tensor

    def add(self, name: str, array: np.ndarray):
        import onnx

        tensor = onnx.TensorProto(name=name, dims=array.shape,
                                  data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        return self._store(tensor, np.ascontiguousarray(array).tobytes())

    def copy(self, tensor, reader: _TensorReader):
        """A kept initializer, re-stored here (its old file is replaced)."""
        import onnx

        out = onnx.TensorProto()
        out.CopyFrom(tensor)
        raw = reader.raw(tensor)
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.HasField('raw_data'):
            self.total += len(raw)  # typed fields (int64 shapes etc.): kept as they are
            return out
        del out.external_data[:]
        out.data_location = onnx.TensorProto.DEFAULT
        return self._store(out, raw)


def _set_opset(model, domain: str, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain == domain:
            opset.version = version
            return
    model.opset_import.add(domain=domain, version=version)
