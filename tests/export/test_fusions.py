"""Graph fusions: merged q/k/v and gate/up MatMuls compute what the traced graph computes, a default
Llama export fuses, validates against PyTorch and records what ran, and the registry names only
fusions that exist."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from autocontrast.bundle import BUFFER_LAYOUT, DECODE, DECODE_ORIGINAL, KVCacheSpec, read_manifest
from autocontrast.config import VocabularyProjectionMode
from autocontrast.errors import ExportError
from autocontrast.export import ExportOptions, export_bundle
from autocontrast.export.fusions import FUSIONS, fuse_shared_input_matmuls, pack_qkv, simplify_reshapes
from autocontrast.export.trace import trace_graph
from autocontrast.export.variants import fusions_for
from autocontrast.export.weights import WeightStore
from autocontrast.models.families import FAMILIES, LlamaFamily, T5Family
from tests.tiny_models import NUM_LAYERS, VOCAB, multi_exit_model

DIRECT = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT


def _quiet(_message: str) -> None:
    pass


def _trace(tiny_checkpoint, directory, **layout: str) -> tuple:
    model = multi_exit_model(tiny_checkpoint("llama", DIRECT), DIRECT)
    family, config = model.family, model.config
    kv = KVCacheSpec(num_layers=model.num_layers, num_kv_heads=family.num_kv_heads(config),
                     head_dim=family.head_dim(config), **layout)
    store = WeightStore(directory)
    path = trace_graph(model, ("original",), kind=DECODE, contrast=None, kv=kv, target=directory / "model.onnx",
                       store=store)
    store.close()
    return path, kv


@pytest.fixture(scope="module")
def traced_llama(tiny_checkpoint, tmp_path_factory):
    """The tiny Llama's traced decode graph (original head, concatenated cache), unfused, and its KV layout."""
    return _trace(tiny_checkpoint, tmp_path_factory.mktemp("traced"))


@pytest.fixture(scope="module")
def traced_llama_gqa(tiny_checkpoint, tmp_path_factory):
    """The same through GroupQueryAttention over an in-place buffer."""
    return _trace(tiny_checkpoint, tmp_path_factory.mktemp("traced-gqa"), layout=BUFFER_LAYOUT)


def _feeds(kv: KVCacheSpec, *, past: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    batch = 2
    feeds = {"input_ids": rng.integers(3, 100, (batch, seq)).astype(np.int64),
             "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))}
    columns = past + seq + 3 if kv.layout == BUFFER_LAYOUT else past  # a buffer: the past, then room
    for name in kv.past_names():  # (batch, kv_heads, columns, head_dim)
        feeds[name] = rng.standard_normal((batch, kv.num_kv_heads, columns, kv.head_dim)).astype(np.float32)
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _matmuls_sharing_an_input(model: onnx.ModelProto) -> int:
    weights = {t.name for t in model.graph.initializer}
    inputs = [n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    return len(inputs) - len(set(inputs))


def test_shared_input_matmuls_merges_qkv_and_gate_up_of_every_layer(traced_llama):
    model = onnx.load(str(traced_llama[0]))
    assert _matmuls_sharing_an_input(model) == 3 * NUM_LAYERS  # q/k/v: 2 extra, gate/up: 1 extra, per layer
    assert fuse_shared_input_matmuls(model) == 2 * NUM_LAYERS
    assert _matmuls_sharing_an_input(model) == 0
    onnx.checker.check_model(model)


@pytest.mark.parametrize("past,seq", [(0, 5), (6, 1)], ids=["prefill", "decode-step"])
def test_shared_input_matmuls_leave_every_output_unchanged(traced_llama, past, seq):
    path, kv = traced_llama
    original = onnx.load(str(path))
    fused = onnx.load(str(path))
    fuse_shared_input_matmuls(fused)
    feeds = _feeds(kv, past=past, seq=seq)
    for want, have in zip(_run(original, feeds), _run(fused, feeds), strict=True):
        np.testing.assert_allclose(have, want, atol=1e-5, rtol=0)


def _lean(path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    fuse_shared_input_matmuls(model)
    simplify_reshapes(model)
    pack_qkv(model)
    return model


@pytest.mark.parametrize("graph", ["traced_llama", "traced_llama_gqa"])
@pytest.mark.parametrize("past,seq", [(0, 5), (6, 1)], ids=["prefill", "decode-step"])
def test_static_reshapes_and_packed_qkv_leave_every_output_unchanged(graph, past, seq, request):
    path, kv = request.getfixturevalue(graph)
    feeds = _feeds(kv, past=past, seq=seq)
    for want, have in zip(_run(onnx.load(str(path)), feeds), _run(_lean(path), feeds), strict=True):
        np.testing.assert_allclose(have, want, atol=1e-5, rtol=0)


def test_a_lean_gqa_layer_computes_no_shapes_and_reads_qkv_packed(traced_llama_gqa):
    path, _ = traced_llama_gqa
    traced, lean = onnx.load(str(path)), _lean(path)

    def layer_ops(model: onnx.ModelProto) -> list[str]:
        return [n.op_type for n in model.graph.node if "/layers.1/" in n.name and n.op_type != "Constant"]

    assert {"Shape", "Concat", "Reshape"} <= set(layer_ops(traced))
    assert not {"Shape", "Gather", "Unsqueeze", "Concat", "Slice", "Reshape"} & set(layer_ops(lean))
    attention = [n for n in lean.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == NUM_LAYERS and all(list(n.input[1:3]) == ["", ""] for n in attention)
    assert len(lean.graph.node) < len(traced.graph.node) / 2
    onnx.checker.check_model(lean)


def test_a_weight_read_by_two_nodes_is_not_merged(traced_llama):
    model = onnx.load(str(traced_llama[0]))
    q_proj = next(n for n in model.graph.node if n.op_type == "MatMul" and "q_proj" in n.name)
    model.graph.node.append(onnx.helper.make_node("Identity", [q_proj.input[1]], ["extra_reader"]))
    assert fuse_shared_input_matmuls(model) == 2 * NUM_LAYERS  # layer 0: k/v merge, q stays apart
    assert q_proj in model.graph.node and _matmuls_sharing_an_input(model) == 1


def test_a_default_llama_export_fuses_validates_against_pytorch_and_records_the_fusions(tiny_checkpoint, tmp_path):
    export_bundle(tiny_checkpoint("llama", DIRECT), tmp_path / "b", options=ExportOptions(score_graph=False),
                  log=_quiet)
    manifest = read_manifest(tmp_path / "b")
    assert manifest.variant["optimize"] is True and manifest.validation["passed"]
    assert manifest.validation["reference"] == "PyTorch float64"
    counts = manifest.variant["fusions"][DECODE_ORIGINAL]
    assert list(counts) == list(LlamaFamily.fusions)
    assert counts["shared_input_matmuls"] == 2 * NUM_LAYERS
    assert all(v > 0 for v in counts.values())  # every fusion the registry lists found its pattern
    assert max(manifest.validation["graphs"][DECODE_ORIGINAL].values()) <= 1e-4  # vs PyTorch, every output
    graph = onnx.load(str(tmp_path / "b" / f"{DECODE_ORIGINAL}.onnx"), load_external_data=False)
    assert _matmuls_sharing_an_input(graph) == 0


def test_no_optimize_exports_the_traced_graph(tiny_checkpoint, tmp_path):
    export_bundle(tiny_checkpoint("llama", DIRECT), tmp_path / "b",
                  options=ExportOptions(score_graph=False, optimize=False), log=_quiet)
    manifest = read_manifest(tmp_path / "b")
    assert manifest.variant["optimize"] is False and "fusions" not in manifest.variant
    graph = onnx.load(str(tmp_path / "b" / f"{DECODE_ORIGINAL}.onnx"), load_external_data=False)
    assert _matmuls_sharing_an_input(graph) == 3 * NUM_LAYERS


def test_optimize_for_a_family_without_fusions_is_a_clear_error():
    with pytest.raises(ExportError, match="--optimize has no graph fusions for 't5'"):
        fusions_for(T5Family, True)
    assert fusions_for(T5Family, None) == ()


def test_every_family_names_only_fusions_that_exist():
    for family in FAMILIES.values():
        assert set(family.fusions) <= set(FUSIONS), family.name
        assert family.fusions or not family.fuses_by_default, family.name


def test_fusions_of_a_lean_graph_whose_norm_weights_are_on_disk_fuse_as_an_in_memory_one(traced_llama_gqa, tmp_path,
                                                                                         monkeypatch):
    """SmolLM2's norm weights (576 floats) lie in weights.bin, the tiny model's inline: with the inline limit
    lowered, ORT's fusions (which check external data from the working directory) must still fuse."""
    from autocontrast.export import weights
    from autocontrast.export.fusions import apply_fusions

    path, kv = traced_llama_gqa
    names = ("shared_input_matmuls", "static_reshapes", "packed_qkv", "simplified_layer_norm",
             "skip_simplified_layer_norm")
    in_memory = onnx.load(str(path))
    want = {name: FUSIONS[name](in_memory, multi_exit_model_stub(), path.parent) for name in names}
    monkeypatch.setattr(weights, "INLINE_LIMIT", 64)
    work = tmp_path / "work"
    work.mkdir()
    store = weights.WeightStore(work)
    lean = weights.ingest_graph(path, work / "decode.onnx", store)
    assert any(weights.is_external(t) and len(t.dims) == 1 for t in weights.load_lean(lean).graph.initializer)
    monkeypatch.chdir(tmp_path)  # not where the weights are
    assert apply_fusions(lean, names, model=multi_exit_model_stub(), store=store) == want
    assert want["skip_simplified_layer_norm"] > 0 and want["simplified_layer_norm"] > 0
    store.close()
    np.testing.assert_allclose(_run_file(lean, _feeds(kv, past=3, seq=1))[0],
                               _run(onnx.load(str(path)), _feeds(kv, past=3, seq=1))[0], atol=1e-5)


def multi_exit_model_stub() -> SimpleNamespace:
    """What these fusions read of a model: its vocabulary size."""
    return SimpleNamespace(config=SimpleNamespace(vocab_size=VOCAB))


def _run_file(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
