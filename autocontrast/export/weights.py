"""The bundle's one weights file, written once and tensor by tensor while the graphs are built.

Every graph of an export lives, from its trace on, as a structure-only `.onnx` file in the bundle's
work directory whose large initializers point, by `(offset, length)`, into one `WeightStore`
(`weights.bin` beside it): identical tensors are stored once (the decode and score graphs share
every layer), and ONNX Runtime reads external data by offset, so the graphs load unchanged. Passes
load graphs with `load_lean` (weights stay on disk; small constants inline), read a weight's values
only where they need them (`read_block`, `numpy_helper.to_array(tensor, base_dir)`), and `save_lean` appends the tensors they made. When the
graphs are final, `finish_weights` drops what no graph reads any more (the unmerged q/k/v matrices
after a fusion, a tied head's transposed copy) by copying the rest, tensor by tensor, into a
compact file. No pass holds a second copy of the model's weights; a 1.7B model's 6.8 GB are
never in memory twice. This also lifts protobuf's 2 GB limit on a single .onnx file.

>>> store = WeightStore(work)  # doctest: +SKIP
>>> ingest_graph(Path("raw/decode/model.onnx"), work / "decode.onnx", store)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

WEIGHTS_FILE = "weights.bin"
INLINE_LIMIT = 1024  # bytes: tensors this small stay inside the graph
ALIGN = 64  # byte alignment of each tensor in the file (lets ORT memory-map it)
COPY_CHUNK = 8 * 1024 * 1024  # bytes per read when compacting (what the copy holds in memory)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph (an If's branches), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
                yield from _graphs(sub)


def initializers(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every initializer of the model, its subgraphs' included."""
    for graph in _graphs(model.graph):
        yield from graph.initializer


def _external(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _small_external(tensor: TensorProto) -> bool:
    """An external tensor of at most `INLINE_LIMIT` bytes: it belongs inside the graph."""
    return is_external(tensor) and int(_external(tensor).get("length", INLINE_LIMIT + 1)) <= INLINE_LIMIT


def _inline(tensor: TensorProto, base_dir: Path | None) -> None:
    """Read an external tensor's data into the proto (`base_dir`: where its location is relative to)."""
    load_external_data_for_tensor(tensor, str(base_dir or "."))
    tensor.data_location = TensorProto.DEFAULT
    del tensor.external_data[:]


class WeightStore:
    """`weights.bin` being written: tensors appended once each (deduplicated by dtype, shape and SHA-1)."""

    def __init__(self, directory: Path, name: str = WEIGHTS_FILE) -> None:
        self.directory, self.name = Path(directory), name
        self.path = self.directory / name
        self._file = open(self.path, "ab+")  # noqa: SIM115 - closed by close()
        self._stored: dict[tuple[int, str, str], tuple[int, int]] = {}

    def put(self, data: bytes | memoryview, data_type: int, dims: list[int] | tuple[int, ...]) -> tuple[int, int]:
        """Store `data` unless an identical tensor is stored; returns its (offset, length)."""
        key = (data_type, ",".join(map(str, dims)), hashlib.sha1(data).hexdigest())
        if key not in self._stored:
            end = self._file.seek(0, os.SEEK_END)
            self._file.write(b"\0" * ((-end) % ALIGN))
            offset = self._file.tell()
            self._file.write(data)
            self._stored[key] = (offset, len(data))
        return self._stored[key]

    def externalize(self, model: onnx.ModelProto, base_dir: Path | None = None) -> None:
        """Move every initializer larger than `INLINE_LIMIT` into the store: one held in the proto, or
        external elsewhere (`base_dir`: where its locations are relative to). The proto then points here."""
        for tensor in initializers(model):
            if is_external(tensor):
                info = _external(tensor)
                if info.get("location") == self.name and base_dir in (None, self.directory):
                    continue  # already here
                if _small_external(tensor):
                    _inline(tensor, base_dir)
                    continue
                data = _read_external(tensor, base_dir)
                offset, length = self.put(data, tensor.data_type, tensor.dims)
                del data
                point_at(tensor, self.name, offset, length)
            else:
                self.take(tensor)
        self.flush()

    def take(self, tensor: TensorProto) -> None:
        """Move a tensor held in the proto into the store (one at most `INLINE_LIMIT` bytes stays)."""
        data = tensor_bytes(tensor)
        if len(data) > INLINE_LIMIT:
            offset, length = self.put(data, tensor.data_type, tensor.dims)
            del data
            point_at(tensor, self.name, offset, length)

    def external(self, array: np.ndarray, name: str) -> TensorProto:
        """A tensor named `name` holding `array`: inline when small, else stored here and pointing here.

        Build it before adding it to a graph: bytes set on a message inside a graph stay in the graph's
        protobuf arena (clearing the field later does not free them) until the whole graph is freed.
        """
        array = np.ascontiguousarray(array)
        if array.nbytes <= INLINE_LIMIT:
            return numpy_helper.from_array(array, name)
        tensor = TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        point_at(tensor, self.name, *self.put(memoryview(array).cast("B"), tensor.data_type, tensor.dims))
        return tensor

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _read_external(tensor: TensorProto, base_dir: Path | None) -> bytes:
    info = _external(tensor)
    path = Path(base_dir or ".") / info["location"]
    with open(path, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"])) if "length" in info else f.read()


def tensor_bytes(tensor: TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def read_block(tensor: TensorProto, base_dir: Path | None, rows: slice, columns: slice) -> np.ndarray:
    """tensor[rows, columns] of a 2-D initializer, read with one positioned read per row where it is
    external (a memory map would fault whole neighbourhoods of a strided block into resident memory)."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)[rows, columns]
    info = _external(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    height, width = tensor.dims
    r0, r1, _ = rows.indices(height)
    c0, c1, _ = columns.indices(width)
    out = np.empty((r1 - r0, c1 - c0), dtype)  # (rows, columns)
    base = int(info.get("offset", 0))
    fd = os.open(Path(base_dir or ".") / info["location"], os.O_RDONLY)
    try:
        for i, row in enumerate(range(r0, r1)):
            start = base + (row * width + c0) * dtype.itemsize
            out[i] = np.frombuffer(os.pread(fd, (c1 - c0) * dtype.itemsize, start), dtype)
    finally:
        os.close(fd)
    return out


def point_at(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def load_lean(path: Path) -> onnx.ModelProto:
    """A graph's structure, its large weights left where they are (small ones loaded inline)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in initializers(model):
        if _small_external(tensor):
            _inline(tensor, Path(path).parent)
    return model


def save_lean(model: onnx.ModelProto, target: Path, store: WeightStore, *, base_dir: Path | None = None) -> Path:
    """Write `model` as `target` (in the store's directory) with its large tensors in the store.

    `base_dir`: where the model's external tensors not yet in the store are (a traced graph's folder).
    """
    if Path(target).parent.resolve() != store.directory.resolve():
        raise ValueError(f"{target} must be beside {store.path}: its tensors point there by a relative path")
    store.externalize(model, base_dir=base_dir or store.directory)
    onnx.save_model(model, str(target))
    return target


def load_graph(path: Path) -> onnx.ModelProto:
    """A graph with all its weights in memory (the passes that rewrite every weight: fp16, quantization)."""
    return onnx.load(str(path), load_external_data=True)


def ingest_graph(source: Path, target: Path, store: WeightStore) -> Path:
    """A traced graph (weights inline, or external beside it) -> `target`, its weights in `store`."""
    model = onnx.load(str(source), load_external_data=False)  # inline weights come with the proto anyway
    for tensor in attribute_tensors(model):  # a >2 GB trace stores Constant values beside it too: inline them
        if is_external(tensor):
            _inline(tensor, Path(source).parent)
    return save_lean(model, target, store, base_dir=Path(source).parent)


def attribute_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Tensors held in node attributes (Constant values), subgraphs included."""
    for graph in _graphs(model.graph):
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t
                yield from attribute.tensors


def finish_weights(graph_files: list[Path], store: WeightStore, *,
                   metadata: dict[Path, dict[str, str]] | None = None) -> None:
    """Compact the store to the tensors the final `graph_files` read (in their order) and stamp each
    graph with `metadata[file]` (ONNX metadata_props). Copies tensor by tensor; never loads the weights."""
    store.close()
    models = {path: onnx.load(str(path), load_external_data=False) for path in graph_files}
    ranges: dict[tuple[int, int], int] = {}  # (old offset, length) -> new offset
    compact = store.path.with_name(store.name + ".compact")
    with open(store.path, "rb") as old, open(compact, "wb") as new:
        for model in models.values():
            for tensor in initializers(model):
                if not is_external(tensor) or _external(tensor).get("location") != store.name:
                    continue
                info = _external(tensor)
                key = (int(info["offset"]), int(info["length"]))
                if key not in ranges:
                    new.write(b"\0" * ((-new.tell()) % ALIGN))
                    ranges[key] = new.tell()
                    old.seek(key[0])
                    for start in range(0, key[1], COPY_CHUNK):
                        new.write(old.read(min(COPY_CHUNK, key[1] - start)))
                point_at(tensor, store.name, ranges[key], key[1])
    os.replace(compact, store.path)
    for path, model in models.items():
        props = {p.key: p.value for p in model.metadata_props}
        props.update((metadata or {}).get(path, {}))
        onnx.helper.set_model_props(model, props)
        onnx.save_model(model, str(path))
