"""The bundle's files: one shared weights file holding each tensor once, the tokenizer, the manifest."""

from __future__ import annotations

import onnx
import pytest

from autocontrast.bundle import read_manifest
from autocontrast.config import VocabularyProjectionMode
from autocontrast.export.weights import WEIGHTS_FILE

LAYER_SPECIFIC = VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION


def _external(bundle, graph_file):
    model = onnx.load(str(bundle / graph_file), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            yield info["location"], int(info["offset"]), int(info["length"])


def test_every_graph_reads_its_weights_from_the_one_shared_file(tiny_bundle):
    bundle = tiny_bundle("llama", LAYER_SPECIFIC)
    manifest = read_manifest(bundle)
    for graph in manifest.graphs:
        assert graph.external_data == (WEIGHTS_FILE,)
        locations = {loc for loc, _, _ in _external(bundle, graph.file)}
        assert locations == {WEIGHTS_FILE}


def test_tensors_shared_by_graphs_are_stored_once(tiny_bundle):
    bundle = tiny_bundle("llama", LAYER_SPECIFIC)
    manifest = read_manifest(bundle)
    per_graph = [set(_external(bundle, g.file)) for g in manifest.graphs]
    referenced = sum(length for graph in per_graph for _, _, length in graph)
    stored = (bundle / WEIGHTS_FILE).stat().st_size
    assert stored < 0.5 * referenced  # three graphs, mostly the same weights
    ranges = sorted({(offset, length) for graph in per_graph for _, offset, length in graph})
    for (a, la), (b, _) in zip(ranges, ranges[1:], strict=False):
        assert a + la <= b  # distinct tensors never overlap


def test_bundle_holds_tokenizer_and_chat_template(tiny_bundle):
    bundle = tiny_bundle("gpt2", LAYER_SPECIFIC)
    manifest = read_manifest(bundle)
    assert "tokenizer.json" in manifest.tokenizer_files
    assert all((bundle / f).is_file() for f in manifest.tokenizer_files)
    assert manifest.chat_template and "im_start" in manifest.chat_template
    assert manifest.special_tokens == {"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": 2}


def test_manifest_records_variant_versions_and_architecture(tiny_bundle):
    manifest = read_manifest(tiny_bundle("gpt_neo", LAYER_SPECIFIC))
    assert manifest.architecture == "gpt_neo" and manifest.num_layers == 4
    assert manifest.variant == {"dtype": "float32", "optimize": False, "quantize": None}
    assert {"torch", "transformers", "onnx", "onnxruntime", "autocontrast"} <= set(manifest.versions)
    assert manifest.exits == (1, 2, 3, 4, "original")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decode_original_returns_only_the_original_head(arch, tiny_bundle):
    manifest = read_manifest(tiny_bundle(arch, LAYER_SPECIFIC))
    graph = manifest.graph_for_exits(["original"])
    assert graph.name == "decode_original" and graph.exits == ("original",) and graph.contrast is None


def test_graph_lookup_resolves_the_top_exit_and_original_as_one_in_shared_modes():
    from autocontrast.bundle import Manifest

    manifest = Manifest.example()  # shared direct, 30 layers: decode_original returns 'original' only
    graph, names = manifest.find_graph([30])
    assert graph.name == "decode_original" and names == ("original",)
    layer_specific = Manifest.from_dict({**manifest.to_dict(), "projection_mode": "LAYER_SPECIFIC_PROJECTION"})
    graph, names = layer_specific.find_graph([30])
    assert graph.name == "decode_exits" and names == (30,)  # its own head: not the original logits
    assert manifest.find_graph([12]) is None
