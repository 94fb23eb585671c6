"""What makes the export quicker must not change what it writes: the exporter's shape inference without
the weights' values, the same-type Cast removal through one index, and the tied-head check's probe."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from autocontrast.bundle import BUFFER_LAYOUT, DECODE, KVCacheSpec
from autocontrast.config import VocabularyProjectionMode
from autocontrast.export import lean_trace
from autocontrast.export.fusions import remove_same_type_casts
from autocontrast.export.tied_head import untie_transposed_copies
from autocontrast.export.trace import trace_graph
from autocontrast.export.weights import WeightStore, ingest_graph, load_lean
from tests.tiny_models import multi_exit_model

DIRECT = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT


def _traced(model, kv, directory):
    directory.mkdir()
    store = WeightStore(directory)
    path = trace_graph(model, ("original", 1), kind=DECODE, contrast=None, kv=kv, target=directory / "g.onnx",
                       store=store)
    store.close()
    proto = onnx.load(str(path), load_external_data=False)
    return proto, (directory / "weights.bin").read_bytes()


def test_shape_inference_without_any_float_value_traces_the_same_graph_and_weights(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch):
    model = multi_exit_model(tiny_checkpoint("llama", DIRECT), DIRECT)
    family, config = model.family, model.config
    kv = KVCacheSpec(num_layers=model.num_layers, num_kv_heads=family.num_kv_heads(config),
                     head_dim=family.head_dim(config), layout=BUFFER_LAYOUT)
    seen = []
    original = lean_trace.torch._C._jit_pass_onnx_graph_shape_type_inference

    def spy(graph, params, opset):
        seen.append(sum(v.is_floating_point() for v in params.values()))
        return original(graph, params, opset)

    monkeypatch.setattr(lean_trace.torch._C, "_jit_pass_onnx_graph_shape_type_inference", spy)
    monkeypatch.setattr(lean_trace, "SHAPE_INFERENCE_VALUE_LIMIT", 1 << 40)  # every value, as torch alone does
    full, full_weights = _traced(model, kv, tmp_path / "full")
    given_all = list(seen)
    seen.clear()
    monkeypatch.setattr(lean_trace, "SHAPE_INFERENCE_VALUE_LIMIT", 0)  # no float value at all
    lean, lean_weights = _traced(model, kv, tmp_path / "lean")
    assert given_all and min(given_all) > 0 and seen and max(seen) == 0  # the pass ran both times, as intended
    assert [(n.op_type, list(n.input), list(n.output), n.attribute) for n in lean.graph.node] == \
           [(n.op_type, list(n.input), list(n.output), n.attribute) for n in full.graph.node]
    assert lean.graph.output == full.graph.output and lean.graph.value_info == full.graph.value_info
    assert lean.graph.initializer == full.graph.initializer and lean_weights == full_weights


def _cast_chain_model() -> onnx.ModelProto:
    """x -> Cast(float) -> Cast(float) -> Relu -> y; Relu -> Cast(float) -> z (a graph output); i -> Cast(float)."""
    nodes = [
        helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT),
        helper.make_node("Relu", ["b"], ["y"]),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Cast", ["s"], ["z"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),  # int -> float: kept
        helper.make_node("Add", ["f", "y"], ["w"]),
    ]
    graph = helper.make_graph(
        nodes, "casts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("y", "z", "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_same_type_casts_go_as_onnx_runtime_removes_them():
    from onnxruntime.transformers.onnx_model import OnnxModel

    ours, theirs = OnnxModel(_cast_chain_model()), OnnxModel(_cast_chain_model())
    assert remove_same_type_casts(ours) == 3
    theirs.remove_useless_cast_nodes()
    assert [(n.op_type, list(n.input), list(n.output)) for n in ours.model.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in theirs.model.graph.node]
    assert sum(n.op_type == "Cast" for n in ours.model.graph.node) == 1
    assert remove_same_type_casts(ours) == 0


def _head_model(embedding: np.ndarray, head: np.ndarray) -> onnx.ModelProto:
    hidden, vocab = head.shape
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embedding", "ids"], ["h"]), helper.make_node("MatMul", ["h", "head"], ["logits"])],
        "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, vocab])],
        [numpy_helper.from_array(embedding, "embedding"), numpy_helper.from_array(head, "head")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("external", [False, True])
def test_a_head_is_untied_only_when_it_is_the_whole_transpose_not_when_its_probe_agrees(tmp_path, external):
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((300, 256)).astype(np.float32)  # (vocab, hidden): 76,800 values
    late = embedding.T.copy()
    late[-1, -1] += 1.0  # agrees with the transpose in every probed entry, differs in its last one
    for head, untied in ((embedding.T.copy(), 1), (late, 0)):
        proto = _head_model(embedding, head)
        base = None
        if external:
            onnx.save(proto, str(tmp_path / "m.onnx"))
            work = tmp_path / f"work{untied}"
            work.mkdir()
            store = WeightStore(work)
            proto = load_lean(ingest_graph(tmp_path / "m.onnx", work / "m.onnx", store))
            store.close()
            base = work
        assert untie_transposed_copies(proto, base_dir=base) == untied
        assert sum(n.op_type == "Gemm" for n in proto.graph.node) == untied
