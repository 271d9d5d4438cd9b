"""ONNX files written one initializer at a time, so that no stage holds a second copy of the weights.

`onnx.save` serialises the whole ModelProto into one bytes object (a copy of every weight) and the TorchScript
exporter builds a C++ proto and two serialised copies of it. Here the graph is kept small (large initializers
live in an external data file while the stages run) and a file is written tensor by tensor:

- `write_model` writes a self-contained file by emitting the graph without its initializers and then a second
  `graph` field holding only the initializers; protobuf merges repeated fields of a message that appears twice,
  so `onnx.load` (and onnxruntime) read the same ModelProto that `onnx.save` would have written.
  Past 2 GB, or when asked, the weights go to `<file>.data` instead (as `onnx.save` with external data does).
- `attach_initializers` turns `torch.onnx.export(export_params=False)` output into a full graph.
- `split_weights` reads a file the other way round: the graph of a self-contained file with its large
  initializers moved to an external data file, reading the file one tensor at a time (int8's pre-processing).
- `lazy_external_data` lets onnxruntime's transformer optimizer read an external tensor only when a fusion
  asks for its values (`numpy_helper.to_array` loads external data relative to the working directory).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import onnx
from onnx import TensorProto
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

TWO_GB = 2 ** 31
EXTERNAL_MIN_BYTES = 1024  # onnx.save's default size_threshold for external data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload_len: int) -> bytes:
    """Tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(payload_len)


def data_bytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's data, in the proto or in its external file."""
    if uses_external_data(tensor):
        return next(int(e.value) for e in tensor.external_data if e.key == "length")
    return len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()


def _shell(message, skip: str):
    """A copy of `message` without its field `skip` (only the small fields are copied)."""
    out = type(message)()
    for fd, value in message.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(out, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    return out


def _inline(tensor: TensorProto, base_dir: Path) -> bytes:
    """The serialised tensor with its data in it (read from its external file if there)."""
    if not uses_external_data(tensor):
        return tensor.SerializeToString()
    copy = TensorProto()
    copy.CopyFrom(tensor)  # no data in it: small
    load_external_data_for_tensor(copy, str(base_dir))
    copy.ClearField("data_location")  # DEFAULT, as a tensor written inline has it
    return copy.SerializeToString()


def write_model(model: onnx.ModelProto, path: Path, base_dir: Path | None = None, external: bool | None = None) -> bool:
    """Write `model` to `path`, reading tensors stored externally from `base_dir` (default: `path`'s folder).
    `external` None: weights go to `<name>.data` when they pass 2 GB. Returns whether they did. The in-memory
    `model` keeps its tensors where they are."""
    path = Path(path)
    base_dir = Path(base_dir) if base_dir is not None else path.parent
    graph = model.graph
    if external is None:
        external = sum(data_bytes(t) for t in graph.initializer) > TWO_GB
    if external:
        _write_external(model, path, base_dir)
        return True
    head = _shell(model, "graph")
    head.graph.CopyFrom(_shell(graph, "initializer"))
    sizes = []
    for t in graph.initializer:  # sizes first: the second graph field's length prefix precedes its tensors
        if uses_external_data(t):
            meta = _shell(t, "external_data")
            meta.ClearField("data_location")
            n = data_bytes(t)
            sizes.append(meta.ByteSize() + len(_field(9, n)) + n)  # raw_data is field 9
        else:
            if t.HasField("data_location"):  # DEFAULT (a tensor read in from external data): as if written inline
                t.ClearField("data_location")
            sizes.append(t.ByteSize())
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        f.write(_field(7, sum(len(_field(5, n)) + n for n in sizes)))  # ModelProto.graph = 7
        for t, n in zip(graph.initializer, sizes):
            blob = _inline(t, base_dir)
            if len(blob) != n:
                raise AssertionError(f"size of initializer {t.name} changed while writing {path.name}")
            f.write(_field(5, n))  # GraphProto.initializer = 5
            f.write(blob)
    return False


def _write_external(model: onnx.ModelProto, path: Path, base_dir: Path) -> None:
    """`path` with every initializer of at least EXTERNAL_MIN_BYTES in `<name>.data`, one tensor at a time."""
    location = path.name + ".data"
    data_path = path.parent / location
    tmp_data = data_path.with_name(data_path.name + ".tmp")  # the source may be the file being replaced
    head = _shell(model, "graph")
    head.graph.CopyFrom(_shell(model.graph, "initializer"))
    with open(tmp_data, "wb") as data:
        for t in model.graph.initializer:
            if data_bytes(t) < EXTERNAL_MIN_BYTES or not (uses_external_data(t) or t.HasField("raw_data")):
                if uses_external_data(t):
                    head.graph.initializer.add().ParseFromString(_inline(t, base_dir))
                else:
                    head.graph.initializer.append(t)
                continue
            meta = head.graph.initializer.add()
            meta.CopyFrom(_shell(t, "raw_data") if not uses_external_data(t) else _shell(t, "external_data"))
            del meta.external_data[:]
            offset = data.tell()
            if uses_external_data(t):
                tensor = TensorProto()
                tensor.ParseFromString(_inline(t, base_dir))
                data.write(tensor.raw_data)
                del tensor
            else:
                data.write(t.raw_data)
            _point(meta, location, offset, data.tell() - offset)
    os.replace(tmp_data, data_path)
    path.write_bytes(head.SerializeToString())


def _point(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` (no data in it) refer to `length` bytes at `offset` of `location`."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        tensor.external_data.add(key=key, value=str(value))
    tensor.data_location = TensorProto.EXTERNAL


def _read_varint(f) -> int:
    n = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise EOFError("truncated protobuf varint")
        n |= (byte[0] & 0x7F) << shift
        shift += 7
        if byte[0] < 0x80:
            return n


def _fields(f, end: int) -> list:
    """(number, start, payload start, end) of each field of the message from `f`'s position up to `end`."""
    out = []
    while f.tell() < end:
        start = f.tell()
        key = _read_varint(f)
        number, wire = key >> 3, key & 7
        if wire == 2:  # length-delimited: the payload follows its length
            length = _read_varint(f)
            payload = f.tell()
            stop = payload + length
        elif wire == 0:
            _read_varint(f)
            payload = stop = f.tell()
        elif wire in (1, 5):
            payload = f.tell()
            stop = payload + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        f.seek(stop)
        out.append((number, start, payload, stop))
    return out


def split_weights(src: Path, data_path: Path, size_threshold: int = EXTERNAL_MIN_BYTES) -> onnx.ModelProto:
    """The ModelProto of `src` with the data of its large initializers in `data_path` (relative to the file this
    model will be saved beside), read and written one tensor at a time: what `onnx.load(src)` and then
    `onnx.save_model(..., save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=...)` give,
    without the file or its weights ever whole in memory. Tensors already external in `src` are copied over."""
    src, data_path = Path(src), Path(data_path)
    pieces = []
    with open(src, "rb") as f, open(data_path, "wb") as data:
        size = f.seek(0, 2)
        f.seek(0)
        for number, start, payload, stop in _fields(f, size):
            if number != 7:  # ModelProto.graph: everything else is small
                f.seek(start)
                pieces.append(f.read(stop - start))
                continue
            graph = []
            f.seek(payload)
            for sub, s_start, s_payload, s_stop in _fields(f, stop):
                f.seek(s_start if sub != 5 else s_payload)
                blob = f.read(s_stop - f.tell())
                if sub == 5:  # GraphProto.initializer
                    tensor = TensorProto()
                    tensor.ParseFromString(blob)
                    del blob
                    if uses_external_data(tensor):
                        tensor.ParseFromString(_inline(tensor, src.parent))
                    if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= size_threshold:
                        offset = data.tell()
                        data.write(tensor.raw_data)
                        tensor.ClearField("raw_data")
                        _point(tensor, data_path.name, offset, data.tell() - offset)
                    blob = tensor.SerializeToString()
                    blob = _field(5, len(blob)) + blob
                graph.append(blob)
            body = b"".join(graph)
            pieces.append(_field(7, len(body)) + body)
    model = onnx.ModelProto()
    model.ParseFromString(b"".join(pieces))  # repeated graph fields merge, as when onnx.load parses the file
    return model


def attach_initializers(path: Path, params: dict, data_name: str) -> None:
    """Complete a graph written by `torch.onnx.export(export_params=False)`: each of `params` (name -> torch
    tensor: what the exporter would have stored) stops being a graph input and becomes an
    initializer, large ones in `data_name` beside `path`, written one tensor at a time."""
    import torch
    from onnx import numpy_helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    keep = [i for i in graph.input if i.name not in params]
    order = [i.name for i in graph.input if i.name in params]  # the exporter's order: that of the graph inputs
    order += [name for name in params if name not in set(order)]
    del graph.input[:]
    graph.input.extend(keep)
    with open(path.parent / data_name, "wb") as data:
        for name in order:
            value = params[name].detach().cpu().contiguous()
            if value.numel() * value.element_size() < EXTERNAL_MIN_BYTES:
                tensor = numpy_helper.from_array(value.numpy(), name)
                graph.initializer.append(tensor)
                continue
            tensor = graph.initializer.add(name=name, data_type=_onnx_dtype(value.dtype))
            tensor.dims.extend(value.shape)
            offset = data.tell()
            data.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
            _point(tensor, data_name, offset, data.tell() - offset)
            del value
    path.write_bytes(model.SerializeToString())


def _onnx_dtype(dtype) -> int:
    import torch

    return {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
            torch.float64: TensorProto.DOUBLE, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
            torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8, torch.bool: TensorProto.BOOL}[dtype]


@contextlib.contextmanager
def lazy_external_data(directory: Path):
    """While active, a tensor whose data is external is read from `directory` when its values are asked for
    (onnx resolves external data relative to the working directory when no base is given)."""
    with contextlib.chdir(directory):
        yield
