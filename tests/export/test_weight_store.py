"""The bundle's weights file as export builds it: a traced graph's weights, inline or beside it, move into
one deduplicated store; Constant values stored beside a large trace come inline; compaction keeps exactly
what the final graphs read."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

from autocontrast.export.weights import WEIGHTS_FILE, WeightStore, finish_weights, ingest_graph, load_lean


def _graph(weight: np.ndarray, constant: np.ndarray) -> onnx.ModelProto:
    """y = (x @ W) + c, with W an initializer and c a Constant node's value."""
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(constant, "c_value")),
             helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_a_trace_with_external_constants_is_ingested_whole_and_runs_without_its_folder(tmp_path):
    rng = np.random.default_rng(0)
    weight, constant = rng.standard_normal((64, 64), np.float32), rng.standard_normal((1, 64), np.float32)
    raw = tmp_path / "raw"
    raw.mkdir()
    model = _graph(weight, constant)
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=0)  # as a >2 GB trace does
    onnx.save_model(model, str(raw / "model.onnx"))
    work = tmp_path / "work"
    work.mkdir()
    store = WeightStore(work)
    target = ingest_graph(raw / "model.onnx", work / "g.onnx", store)
    shutil.rmtree(raw)
    finish_weights([target], store)
    x = rng.standard_normal((1, 64), np.float32)
    np.testing.assert_allclose(_run(target, x), x @ weight + constant, rtol=1e-5, atol=1e-5)
    assert (work / WEIGHTS_FILE).stat().st_size == weight.nbytes


def test_identical_tensors_of_two_graphs_are_stored_once_and_compaction_drops_the_unread(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 64), np.float32)
    store = WeightStore(tmp_path)
    paths = []
    for name in ("a", "b"):
        onnx.save_model(_graph(weight, np.zeros((1, 64), np.float32)), str(tmp_path / f"raw-{name}.onnx"))
        paths.append(ingest_graph(tmp_path / f"raw-{name}.onnx", tmp_path / f"{name}.onnx", store))
    store.put(rng.standard_normal(4096).astype(np.float32).tobytes(), TensorProto.FLOAT, [4096])  # read by none
    assert (tmp_path / WEIGHTS_FILE).stat().st_size > weight.nbytes
    finish_weights(paths, store, metadata={paths[0]: {"k": "v"}})
    assert (tmp_path / WEIGHTS_FILE).stat().st_size == weight.nbytes
    assert {p.key: p.value for p in load_lean(paths[0]).metadata_props} == {"k": "v"}
    x = rng.standard_normal((1, 64), np.float32)
    for path in paths:
        np.testing.assert_allclose(_run(path, x), x @ weight, rtol=1e-5, atol=1e-5)
