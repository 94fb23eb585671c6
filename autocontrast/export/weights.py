"""One deduplicated external weights file for all the graphs of a bundle.

Each graph is exported on its own (with its own copy of the weights); `write_shared_weights`
moves every large initializer of every graph into one file, storing identical tensors once, and
points each initializer at its `(offset, length)` there. ONNX Runtime reads external data by
offset, so the graphs load unchanged; the bundle holds the weights once, not once per graph.
This also lifts protobuf's 2 GB limit on a single .onnx file.

>>> files = write_shared_weights({"decode": Path("raw/decode.onnx"), "score": Path("raw/score.onnx")},
...                              bundle_dir)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

WEIGHTS_FILE = "weights.bin"
INLINE_LIMIT = 1024  # bytes: tensors this small stay inside the graph
ALIGN = 64  # byte alignment of each tensor in the file (lets ORT memory-map it)


def load_graph(path: Path) -> onnx.ModelProto:
    """A graph with all its weights in memory (from its own external data, if any)."""
    return onnx.load(str(path), load_external_data=True)


def save_graph(model: onnx.ModelProto, target: Path) -> Path:
    """Write a working graph with its larger tensors in `<target>.data` beside it; returns `target`."""
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=target.name + ".data", size_threshold=INLINE_LIMIT)
    return target


def tensor_bytes(tensor: TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def write_shared_weights(graphs: dict[str, Path], bundle_dir: Path, *, weights_file: str = WEIGHTS_FILE,
                         transform: Callable[[onnx.ModelProto], object] | None = None,
                         metadata: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Write each graph as `<name>.onnx` with its weights in one shared, deduplicated file.

    `graphs` maps names to exported graph files; they are loaded one at a time (so peak memory
    is one graph's weights, not all of them), passed through `transform` if given, stamped with
    `metadata[name]` (ONNX metadata_props), and written.
    Returns {graph name: graph file name}.
    """
    stored: dict[tuple[int, str, str], tuple[int, int]] = {}  # (dtype, dims, sha1) -> (offset, length)
    files: dict[str, str] = {}
    with open(bundle_dir / weights_file, "wb") as out:
        for name, path in graphs.items():
            model = load_graph(path)
            if transform is not None:
                transform(model)
            for tensor in model.graph.initializer:
                data = tensor_bytes(tensor)
                if len(data) <= INLINE_LIMIT:
                    continue
                key = (tensor.data_type, ",".join(map(str, tensor.dims)), hashlib.sha1(data).hexdigest())
                if key not in stored:
                    pad = (-out.tell()) % ALIGN
                    out.write(b"\0" * pad)
                    stored[key] = (out.tell(), len(data))
                    out.write(data)
                offset, length = stored[key]
                _point_at(tensor, weights_file, offset, length)
            for key, value in (metadata or {}).get(name, {}).items():
                onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, key: value})
            file_name = f"{name}.onnx"
            onnx.save_model(model, str(bundle_dir / file_name))
            files[name] = file_name
            del model
    return files


def _point_at(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
