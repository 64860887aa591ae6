"""Move a graph's weights from its one external-data file into the .onnx file, one tensor in memory at a time.

    write_inline('tmp/backbone.onnx')   # backbone.onnx (+ backbone.onnx.data) -> backbone.onnx alone

The result is byte for byte what `onnx.save_model(onnx.load(path), path)` writes, without its memory: that holds
every weight twice (the loaded model, then its serialized bytes: 0.86 GB for SmolVLM2-256M's 0.43 GB backbone,
the export's peak; benchmarks/export_memory.py). Here only the graph without its weights (~1 MB) and one tensor are
held: protobuf writes a message's fields in field-number order, each as tag, length, bytes, so the ModelProto is
written as its fields before `graph` (7), the graph's tag and length (computed from each initializer's size, known
from its external-data length before any data is read), the graph's fields before `initializer` (5), every
initializer (read from the data file, written, released), the graph's fields after it, then the model's after it.
Written to a temporary file and renamed over `path`; the data file is removed only after that.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

GRAPH_FIELD = 7  # onnx.proto: ModelProto.graph
INITIALIZER_FIELD = 5  # GraphProto.initializer
RAW_DATA_FIELD = 9  # TensorProto.raw_data
LENGTH_DELIMITED = 2  # protobuf wire type of messages and bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | LENGTH_DELIMITED)


def _split(message, field: int) -> tuple[bytes, bytes]:
    """`message` serialized without field `field`: (its fields numbered below it, those above it)."""
    below, above = type(message)(), type(message)()
    below.CopyFrom(message)
    above.CopyFrom(message)
    for fd, _ in message.ListFields():
        if fd.number <= field:
            above.ClearField(fd.name)
        if fd.number >= field:
            below.ClearField(fd.name)
    return below.SerializeToString(), above.SerializeToString()


def _external_length(tensor, folder: Path) -> int:
    """The byte count of an external tensor's data (its 'length' entry, or the rest of its file)."""
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    if info.length is not None:
        return info.length
    return (folder / info.location).stat().st_size - (info.offset or 0)


def _inlined_size(tensor, length: int) -> int:
    """Serialized size of `tensor` (external data cleared, DEFAULT location) once its `length` raw bytes are set."""
    return tensor.ByteSize() + len(_key(RAW_DATA_FIELD)) + len(_varint(length)) + length


def _as_inline(tensor) -> None:
    """What onnx.load does to an external tensor besides reading its bytes."""
    from onnx import TensorProto

    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT


def write_inline(path: str | Path) -> None:
    """Rewrite graph `path` with all its external data inline (at most one `<file>.data`, removed afterwards).

    Tensors outside graph.initializer that use external data (node attributes, subgraphs) are read into the small
    graph first. Raises ValueError if the graph names another data file, and RuntimeError if an initializer's
    written size differs from the size announced in the graph's length (the file is then not replaced)."""
    import onnx
    from onnx.external_data_helper import (ExternalDataInfo, _get_all_tensors, load_external_data_for_tensor,
                                           uses_external_data)

    path = Path(path)
    folder = path.parent
    model = onnx.load(str(path), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}
    if locations - {path.name + '.data'}:
        raise ValueError(f'{path}: weights in {sorted(locations)}, expected only {path.name}.data')
    heads = [t.SerializeToString() for t in model.graph.initializer]  # graph-only: external tensors carry no bytes
    del model.graph.initializer[:]
    for t in _get_all_tensors(model):  # what is left: attribute tensors; rare and small, read them here
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(folder))
            _as_inline(t)

    tensors, sizes = [], []
    for head in heads:
        t = onnx.TensorProto.FromString(head)
        length = _external_length(t, folder) if uses_external_data(t) else None
        if length is not None:
            _as_inline(t)
        sizes.append(t.ByteSize() if length is None else _inlined_size(t, length))
        tensors.append((head, length is not None))
    model_below, model_above = _split(model, GRAPH_FIELD)
    graph_below, graph_above = _split(model.graph, INITIALIZER_FIELD)
    graph_size = len(graph_below) + len(graph_above) + sum(len(_key(INITIALIZER_FIELD)) + len(_varint(s)) + s
                                                           for s in sizes)
    del model

    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(model_below + _key(GRAPH_FIELD) + _varint(graph_size) + graph_below)
            for (head, external), size in zip(tensors, sizes):
                t = onnx.TensorProto.FromString(head)
                if external:
                    load_external_data_for_tensor(t, str(folder))  # this tensor's bytes only
                    _as_inline(t)
                data = t.SerializeToString()
                del t
                if len(data) != size:
                    raise RuntimeError(f'{path}: initializer serialized to {len(data)} bytes, {size} announced')
                f.write(_key(INITIALIZER_FIELD) + _varint(size))
                f.write(data)
                del data
            f.write(graph_above + model_above)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for location in locations:
        (folder / location).unlink()
