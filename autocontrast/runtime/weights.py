"""One copy of a bundle's weights in memory, shared by every CPU session that reads them.

ONNX Runtime loads each session's initializers on its own, and on CPU MLAS then packs every
MatMul/Gemm weight into a buffer of the session's own ("pre-packing"): a Generator serving the
original head, exit 15 and ACD through three graph files holds the weights three times (a bundle
whose three decode entries name one switched graph, the default export, holds them once: one
session). With `share_weights=True` the
runtime instead memory-maps each external-data file (`weights.bin`) once per process, read-only,
wraps each external initializer as an OrtValue viewing that mapping (no copy), hands those to
every session through `SessionOptions.add_initializer` and turns pre-packing off, so every
session (and every Generator on the same file in this process) reads the one mapping. Measured
(see README, "Memory"): `add_external_initializers` copies the buffers, `add_initializer` does
not; pre-packed copies are per session (the Python API has no shared pre-packed container), so
sharing costs the step time that pre-packing saves. Quantized weights (MatMulNBits) are the
exception: their unpacked kernel is far slower, so a graph with them keeps pre-packing and its
quantized weights stay per session; only its other weights (the fp32 embedding) are shared.

The index (name, file, offset, length, dtype, shape of each external initializer) is read from
the graph's protobuf directly, so the runtime needs no `onnx` package.

>>> from autocontrast.runtime.weights import shared_initializers
>>> shared = shared_initializers(Path("bundle/decode_original.onnx"))  # doctest: +SKIP
>>> sorted(shared.values)[:2]  # doctest: +SKIP
['model.embed_tokens.weight', 'onnx::MatMul_1234']
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import weakref
from pathlib import Path

import numpy as np
import onnxruntime as ort

from autocontrast.errors import BundleError

# ONNX TensorProto.DataType -> NumPy dtype, for the types a bundle's weights use (others load through ORT)
NUMPY_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
                9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# ORT's unpacked MatMulNBits kernel is ~16x slower than its pre-packed one (int8 SmolLM2, README): graphs
# with it keep pre-packing, and their quantized weights stay each session's own
QUANTIZED_MATMUL = b"MatMulNBits"


@dataclasses.dataclass(frozen=True)
class ExternalTensor:
    """Where one initializer's bytes live: `length` bytes at `offset` of `location` (relative to the graph)."""

    name: str
    location: str
    offset: int
    length: int
    data_type: int  # ONNX TensorProto.DataType
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class GraphIndex:
    tensors: tuple[ExternalTensor, ...]  # external initializers, in file order
    quantized: frozenset[str]  # initializers MatMulNBits nodes read (packed per session, see `shared_initializers`)


def read_index(graph_path: Path) -> GraphIndex:
    """The external initializers of an ONNX graph file (top-level graph) and which of them are quantized weights."""
    try:
        data = Path(graph_path).read_bytes()
        graph = next((v for f, v in _fields(data) if f == 7), None)  # ModelProto.graph
        fields = [] if graph is None else _fields(graph)
        tensors = [_tensor(v) for f, v in fields if f == 5]  # GraphProto.initializer
        quantized = set()
        for node in (_by_field(_fields(v)) for f, v in fields if f == 1):  # GraphProto.node
            if node.get(4) == [QUANTIZED_MATMUL]:  # NodeProto.op_type; inputs are field 1
                quantized.update(name.decode("utf-8") for name in node.get(1, ()))
    except (ValueError, LookupError, UnicodeDecodeError) as err:
        raise BundleError(f"{graph_path} is not a readable ONNX graph ({err}); re-export the bundle") from None
    return GraphIndex(tuple(t for t in tensors if t is not None), frozenset(quantized))


def _by_field(fields: list[tuple[int, int | bytes]]) -> dict[int, list[int | bytes]]:
    found: dict[int, list[int | bytes]] = {}
    for field, value in fields:
        found.setdefault(field, []).append(value)
    return found


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Protobuf wire format: (field number, varint value or length-delimited bytes) of one message."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
            if pos > len(data):
                raise ValueError("truncated message")
        elif wire in (1, 5):
            value, pos = data[pos:pos + (8 if wire == 1 else 4)], pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((field, value))
    return out


def _tensor(message: bytes) -> ExternalTensor | None:
    """A TensorProto's external-data entry, or None when its data is inline."""
    dims: list[int] = []
    name, data_type, location, entries = "", 0, 0, {}
    for field, value in _fields(message):
        if field == 1:  # dims: packed or not
            if isinstance(value, bytes):
                pos = 0
                while pos < len(value):
                    dim, pos = _varint(value, pos)
                    dims.append(dim)
            else:
                dims.append(value)
        elif field == 2:
            data_type = value
        elif field == 8:
            name = value.decode("utf-8")
        elif field == 13:  # external_data: StringStringEntryProto {key = 1, value = 2}
            kv = dict(_fields(value))
            entries[kv.get(1, b"").decode("utf-8")] = kv.get(2, b"").decode("utf-8")
        elif field == 14:
            location = value
    if location != EXTERNAL:
        return None
    offset, length = int(entries.get("offset", 0)), entries.get("length")
    return ExternalTensor(name, entries["location"], offset, int(length) if length is not None else -1, data_type,
                          tuple(dims))


class MappedFile:
    """One external-data file memory-mapped read-only; `view(tensor)` is a zero-copy array of one tensor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.array = np.memmap(path, dtype=np.uint8, mode="r")  # (bytes,)
        self._values: dict[tuple, ort.OrtValue] = {}
        self._lock = threading.Lock()

    def value(self, tensor: ExternalTensor) -> ort.OrtValue | None:
        """The OrtValue over `tensor`'s bytes in this mapping (one per tensor, shared); None for a dtype
        this module does not map (ORT then loads that tensor itself)."""
        dtype = NUMPY_DTYPES.get(tensor.data_type)
        if dtype is None:
            return None
        key = (tensor.offset, tensor.length, tensor.data_type, tensor.shape)
        with self._lock:
            if key not in self._values:
                self._values[key] = ort.OrtValue.ortvalue_from_numpy(self._view(tensor, np.dtype(dtype)))
            return self._values[key]

    def _view(self, tensor: ExternalTensor, dtype: np.dtype) -> np.ndarray:
        size = self.array.shape[0]
        want = math.prod(tensor.shape) * dtype.itemsize
        length = want if tensor.length < 0 else tensor.length
        if length != want:
            raise BundleError(f"initializer {tensor.name!r} of shape {list(tensor.shape)} ({dtype}) needs {want} bytes "
                              f"but its graph says {length} bytes in {self.path.name}: the graph and the weights "
                              "file do not match; re-export the bundle")
        if tensor.offset < 0 or tensor.offset + length > size:
            raise BundleError(f"{self.path} holds {size} bytes but initializer {tensor.name!r} lies at bytes "
                              f"{tensor.offset}..{tensor.offset + length}: the weights file is truncated or not this "
                              "bundle's; restore it (acd-verify checks every file) or re-export the bundle")
        if tensor.offset % dtype.itemsize:
            raise BundleError(f"initializer {tensor.name!r} starts at byte {tensor.offset} of {self.path.name}, not "
                              f"aligned to its {dtype} elements; re-export the bundle")
        return self.array[tensor.offset:tensor.offset + length].view(dtype).reshape(tensor.shape)


_MAPPED: weakref.WeakValueDictionary[tuple, MappedFile] = weakref.WeakValueDictionary()
_MAPPED_LOCK = threading.Lock()


def mapped_file(path: Path) -> MappedFile:
    """The process's one mapping of `path` (the same file opened by another Generator shares it)."""
    try:
        stat = os.stat(path)
    except OSError as err:
        raise BundleError(f"cannot read the weights file {path}: {err.strerror}; restore it or re-export the "
                          "bundle") from None
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)  # a rewritten file is a new mapping
    with _MAPPED_LOCK:
        found = _MAPPED.get(key)
        if found is None:
            found = _MAPPED[key] = MappedFile(Path(path))
        return found


@dataclasses.dataclass(frozen=True)
class SharedInitializers:
    """A graph's external initializers as OrtValues over the process's mappings of their files.

    Holding this keeps those mappings (and so every other session's view of them) alive.
    """

    values: dict[str, ort.OrtValue]  # initializer name -> OrtValue viewing its bytes in `files`
    files: tuple[MappedFile, ...]
    prepack: bool  # the graph has quantized MatMuls: keep ORT's pre-packing on (they are not in `values`)


def shared_initializers(graph_path: Path) -> SharedInitializers:
    """Every external initializer of a graph, viewing the one mapping of its file; keep the result
    as long as the session that uses them lives."""
    graph_path = Path(graph_path)
    root = graph_path.resolve().parent
    values, files = {}, {}
    index = read_index(graph_path)
    for tensor in index.tensors:
        if tensor.name in index.quantized:
            continue
        path = (root / tensor.location).resolve()
        if root not in path.parents:
            raise BundleError(f"graph {graph_path.name} reads initializer {tensor.name!r} from {tensor.location!r}, "
                              "outside its bundle; re-export the bundle")
        mapped = files.setdefault(path, mapped_file(path))
        value = mapped.value(tensor)
        if value is not None:
            values[tensor.name] = value
    return SharedInitializers(values, tuple(files.values()), prepack=bool(index.quantized))
