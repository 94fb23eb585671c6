"""Shared weights (`share_weights=True`): every CPU session reads one memory map of the weights file,
in place, and computes what a session that loads its own weights computes."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest

from autocontrast.bundle import MIXED, TOKEN_INPUTS, chunk_name, read_manifest
from autocontrast.config import MultiExitConfiguration
from autocontrast.errors import BundleError
from autocontrast.export.weights import WEIGHTS_FILE
from autocontrast.runtime import Generator
from autocontrast.runtime.session import load_session
from autocontrast.runtime.weights import read_index
from tests.runtime.conftest import CONTRAST

MODES = (MultiExitConfiguration(),
         MultiExitConfiguration(use_original_head=False, output_layer_index=CONTRAST[1]),
         MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST))


def _prefill_feeds(session: ort.InferenceSession, manifest, graph) -> dict[str, np.ndarray]:
    """A batch of 2 random 5-token prompts (with an empty past for a decode graph); for a mixed-step graph, the
    first token of each as its decode rows and the first prompt as its chunk."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, manifest.vocab_size, size=(2, 5), dtype=np.int64)  # (batch, seq)
    kv = manifest.kv_for(graph)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(5, dtype=np.int64), ids.shape).copy()}
    for name in kv.past_names():
        feeds[name] = np.zeros((2, kv.num_kv_heads, 0, kv.head_dim), np.float32)  # (batch, kv_heads, 0, head_dim)
    if graph.kind == MIXED:
        feeds |= {chunk_name(name): value[:1] for name, value in feeds.items()}
        feeds |= {name: value[:, :1] for name, value in feeds.items() if name in TOKEN_INPUTS}
    return {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "bundle")


def test_shared_sessions_compute_what_sessions_loading_their_own_weights_compute(llama_bundle):
    manifest = read_manifest(llama_bundle)
    assert len(manifest.graphs) >= 3  # decode_original, decode_exits (fused contrast), score
    for graph in manifest.graphs:
        reference = ort.InferenceSession(str(llama_bundle / graph.file), providers=["CPUExecutionProvider"])
        shared = load_session(llama_bundle, graph.file, share_weights=True)
        external = read_index(llama_bundle / graph.file).tensors
        assert external and set(shared.shared_initializers.values) == {t.name for t in external}
        feeds = _prefill_feeds(reference, manifest, graph)
        names = [o.name for o in reference.get_outputs()]
        for name, want, got in zip(names, reference.run(names, feeds), shared.run(names, feeds), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{graph.name}: {name}")


def test_shared_generator_generates_the_same_tokens_in_every_mode(llama_bundle, llama_generator):
    shared = Generator(llama_bundle, share_weights=True, preload=MODES)
    for mode in MODES:
        want = llama_generator.generate(["The history of", "A river"], multi_exit=mode, max_new_tokens=8,
                                        ignore_eos=True)
        got = shared.generate(["The history of", "A river"], multi_exit=mode, max_new_tokens=8, ignore_eos=True)
        assert got.token_ids == want.token_ids


def test_every_session_reads_one_mapping_of_the_weights_file_in_place(llama_bundle, tmp_path):
    bundle = _copy(llama_bundle, tmp_path)
    first, second = (Generator(bundle, share_weights=True, preload=()) for _ in range(2))
    sessions = [gen.session(graph) for gen in (first, second) for graph in gen.manifest.graphs]
    assert len({id(s.session) for s in sessions}) == 2 * len(first.manifest.graphs)  # every graph, twice
    embedding = max(read_index(bundle / sessions[0].graph.file).tensors, key=lambda t: t.length).name
    assert len({s.session.shared_initializers.values[embedding].data_ptr() for s in sessions}) == 1

    def logits() -> list[np.ndarray]:
        outs = []
        for s in sessions:
            feeds = _prefill_feeds(s.session, first.manifest, s.graph)
            outs.append(s.session.run([s.graph.logits_output], feeds)[0])
        return outs

    before = logits()
    # halve every float weight in the file itself: sessions that copied their weights would not notice
    weights = np.memmap(bundle / WEIGHTS_FILE, dtype=np.uint8, mode="r+")
    floats = {(t.offset, t.length) for s in sessions for t in read_index(bundle / s.graph.file).tensors
              if t.data_type == 1}
    for offset, length in floats:
        weights[offset:offset + length].view(np.float32)[:] *= 0.5
    weights.flush()
    for graph_before, graph_after, s in zip(before, logits(), sessions, strict=True):
        assert not np.allclose(graph_before, graph_after), s.graph.name


def test_a_truncated_weights_file_is_a_bundle_error(llama_bundle, tmp_path):
    bundle = _copy(llama_bundle, tmp_path)
    with open(bundle / WEIGHTS_FILE, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(BundleError, match="truncated"):
        Generator(bundle, share_weights=True)


def test_a_graph_whose_index_disagrees_with_its_tensor_shape_is_a_bundle_error(llama_bundle, tmp_path):
    onnx = pytest.importorskip("onnx")
    bundle = _copy(llama_bundle, tmp_path)
    graph = read_manifest(bundle).graph_for_exits(["original"])
    model = onnx.load(str(bundle / graph.file), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entry = next(e for e in tensor.external_data if e.key == "length")
    entry.value = str(int(entry.value) - 4)
    onnx.save_model(model, str(bundle / graph.file))
    with pytest.raises(BundleError, match="do not match"):
        Generator(bundle, share_weights=True)


def test_a_graph_file_that_is_not_onnx_is_a_bundle_error(tmp_path):
    path = tmp_path / "decode_original.onnx"
    path.write_bytes(b"\x3a\xff\xff\xff\xff\x0f not a protobuf")
    with pytest.raises(BundleError, match="not a readable ONNX graph"):
        read_index(path)


def test_quantized_matmul_weights_stay_pre_packed_and_compute_the_same(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    k, n, block = 64, 48, 16
    rng = np.random.default_rng(0)
    packed = numpy_helper.from_array(rng.integers(0, 256, (n, k // block, block), dtype=np.uint8), "packed")
    scales = numpy_helper.from_array(rng.random(n * k // block, dtype=np.float32), "scales")
    table = numpy_helper.from_array(rng.standard_normal((256, k)).astype(np.float32), "table")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]),
             helper.make_node("MatMulNBits", ["x", "packed", "scales"], ["y"], domain="com.microsoft", K=k, N=n,
                              bits=8, block_size=block)]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
                              initializer=[packed, scales, table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save_model(model, str(tmp_path / "q.onnx"), save_as_external_data=True, location=WEIGHTS_FILE,
                    size_threshold=0)
    shared = load_session(tmp_path, "q.onnx", share_weights=True)
    assert read_index(tmp_path / "q.onnx").quantized == {"x", "packed", "scales"}
    assert shared.shared_initializers.prepack and set(shared.shared_initializers.values) == {"table"}
    ids = {"ids": np.array([3, 200], np.int64)}
    reference = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(shared.run(None, ids)[0], reference.run(None, ids)[0], rtol=1e-5, atol=1e-5)
