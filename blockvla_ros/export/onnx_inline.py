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

    load_without_weights('backbone.onnx')   # what onnx.load(path, load_external_data=False) gives an external graph

The reverse for checks of a graph (its I/O, its ops): an inline graph is read field by field and each initializer
parsed on its own, its bytes dropped, so the result holds no weight (onnx.load held the file's bytes and the parsed
weights at once: 0.86 GB for the 0.43 GB backbone).
"""
from __future__ import annotations

from pathlib import Path

from ..io.atomic import atomic_file

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

    with atomic_file(path) as f:
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
    for location in locations:
        (folder / location).unlink()


def _read_varint(f) -> int | None:
    shift = result = 0
    while True:
        byte = f.read(1)
        if not byte:
            if shift:
                raise ValueError('truncated varint')
            return None
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7


def _fields(f, end: int):
    """(field number, key bytes, payload length or None, payload start) of each field of a message in f up to `end`
    (f positioned at the message's first byte; non-length-delimited payloads are returned whole in `key`)."""
    while f.tell() < end:
        start = f.tell()
        key = _read_varint(f)
        field, wire = key >> 3, key & 7
        if wire == LENGTH_DELIMITED:
            length = _read_varint(f)
            yield field, length, f.tell(), start
            f.seek(f.tell() + length)
        elif wire == 0:
            _read_varint(f)
            yield field, None, f.tell(), start
        elif wire in (1, 5):
            f.seek(f.tell() + (8 if wire == 1 else 4))
            yield field, None, f.tell(), start
        else:
            raise ValueError(f'unsupported protobuf wire type {wire}')


def load_without_weights(path: str | Path):
    """The ModelProto of `path` with every initializer's data dropped (raw_data and the typed data fields; external
    data references kept), reading one initializer at a time."""
    import onnx

    path = Path(path)
    size = path.stat().st_size
    model, graph = bytearray(), bytearray()
    with open(path, 'rb') as f:
        for field, length, at, start in list(_fields(f, size)):
            if field != GRAPH_FIELD or length is None:
                f.seek(start)
                model += f.read(at + (length or 0) - start)
                continue
            f.seek(at)
            for g_field, g_length, g_at, g_start in list(_fields(f, at + length)):
                f.seek(g_start)
                if g_field != INITIALIZER_FIELD:
                    graph += f.read(g_at + (g_length or 0) - g_start)
                    continue
                f.seek(g_at)
                tensor = onnx.TensorProto.FromString(f.read(g_length))
                for name in ('raw_data', 'float_data', 'int32_data', 'int64_data', 'double_data', 'uint64_data',
                             'string_data'):
                    tensor.ClearField(name)
                head = tensor.SerializeToString()
                graph += _key(INITIALIZER_FIELD) + _varint(len(head)) + head
    return onnx.ModelProto.FromString(bytes(model) + _key(GRAPH_FIELD) + _varint(len(graph)) + bytes(graph))
