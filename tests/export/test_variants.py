"""Variants export, validate with their own tolerance, and say in the manifest what they are."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from autocontrast.bundle import DECODE_EXITS, LOGITS_OUTPUT, read_manifest
from autocontrast.config import VocabularyProjectionMode
from autocontrast.export import ExportOptions, export_bundle
from autocontrast.export.variants import QUANTIZATIONS
from tests.export.ort_loop import GraphRunner

DIRECT = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT


def _quiet(_message: str) -> None:
    pass


def test_float16_bundle_stores_half_precision_weights_and_float32_logits(tiny_checkpoint, tiny_bundle, tmp_path):
    fp32 = tiny_bundle("llama", DIRECT)
    export_bundle(tiny_checkpoint("llama", DIRECT), tmp_path / "b", options=ExportOptions(dtype="float16"), log=_quiet)
    manifest = read_manifest(tmp_path / "b")
    assert manifest.variant["dtype"] == "float16" and manifest.validation["passed"]
    assert manifest.validation["tolerance"]["logits"] > 1e-3  # its own, looser tolerance
    ratio = (tmp_path / "b" / "weights.bin").stat().st_size / (fp32 / "weights.bin").stat().st_size
    assert 0.45 < ratio < 0.6
    graph = onnx.load(str(tmp_path / "b" / "decode_exits.onnx"), load_external_data=False)
    kv = set(manifest.kv_cache.past_names() + manifest.kv_cache.present_names())
    assert {o.type.tensor_type.elem_type for o in graph.graph.output if o.name not in kv} == {onnx.TensorProto.FLOAT}
    # the KV buffer is float16 like the attention that writes it in place: GroupQueryAttention reads
    # the graph's past inputs themselves (a Cast in between would be a copy of the whole cache per step)
    assert manifest.kv_cache.layout == "buffer" and manifest.kv_cache.dtype == "float16"
    assert {v.type.tensor_type.elem_type for v in (*graph.graph.input, *graph.graph.output)
            if v.name in kv} == {onnx.TensorProto.FLOAT16}
    attention = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == manifest.num_layers
    assert all(set(n.input[3:5]) <= kv for n in attention)


def test_float16_logits_stay_close_to_float32(tiny_checkpoint, tiny_bundle, tmp_path):
    export_bundle(tiny_checkpoint("llama", DIRECT), tmp_path / "b", options=ExportOptions(dtype="float16"), log=_quiet)
    ids, mask = np.array([[5, 6, 7, 8]]), np.ones((1, 4), np.int64)
    half = GraphRunner(tmp_path / "b", DECODE_EXITS).prefill(ids, mask)[LOGITS_OUTPUT]
    full = GraphRunner(tiny_bundle("llama", DIRECT), DECODE_EXITS).prefill(ids, mask)[LOGITS_OUTPUT]
    np.testing.assert_allclose(half, full, atol=0.05)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "phi3"])
def test_optimized_bundle_validates_and_is_marked(arch, tiny_checkpoint, tmp_path):
    export_bundle(tiny_checkpoint(arch, DIRECT), tmp_path / "b",
                  options=ExportOptions(optimize=True, fuse_contrast=(3, 1)), log=_quiet)
    manifest = read_manifest(tmp_path / "b")
    assert manifest.variant["optimize"] is True and manifest.validation["passed"]
    assert manifest.validation["tolerance"]["logits"] == 1e-3
    counts = manifest.variant["fusions"][DECODE_EXITS]
    assert counts and all(n > 0 for n in counts.values())  # each fusion the family names found its pattern
    assert max(manifest.validation["graphs"][DECODE_EXITS].values()) <= 1e-4  # vs PyTorch


def test_float16_and_int8_together_are_refused():
    from autocontrast.errors import ExportError

    with pytest.raises(ExportError, match="do not combine it with --dtype float16"):
        ExportOptions(dtype="float16", quantize="int8")


@pytest.mark.parametrize("quantize", sorted(QUANTIZATIONS))
def test_quantized_bundle_records_its_recipe_and_agreement_and_quantizes_the_head(quantize, tiny_checkpoint,
                                                                                 tmp_path):
    recipe = QUANTIZATIONS[quantize]
    export_bundle(tiny_checkpoint("llama", DIRECT), tmp_path / "b",
                  options=ExportOptions(quantize=quantize, fuse_contrast=(3, 1), score_graph=False), log=_quiet)
    manifest = read_manifest(tmp_path / "b")
    assert manifest.validation["passed"]
    assert manifest.variant["quantization"] == recipe.to_dict()
    agreement = manifest.variant["agreement"]
    assert agreement["steps"] == 96 and 0.0 <= agreement["rate"] <= 1.0
    assert agreement["rate"] == agreement["agreed"] / agreement["steps"]
    graph = onnx.load(str(tmp_path / "b" / "decode_exits.onnx"), load_external_data=False).graph
    vocab_sized = {t.name for t in graph.initializer if manifest.vocab_size in t.dims}
    heads = [n for n in graph.node if set(n.input) & vocab_sized and n.op_type != "Gather"]
    # the tied head is its own quantized matrix: a step reads no float32 vocabulary matrix
    assert heads and all(n.op_type == "MatMulNBits" for n in heads)
    assert all(a.i == (recipe.head_bits or recipe.bits) for n in heads for a in n.attribute if a.name == "bits")
    layers = [n for n in graph.node if n.op_type == "MatMulNBits" and n not in heads]
    for node in layers:  # attention projections (module path names `attn`) may be wider than the rest
        wanted = (recipe.attention_bits or recipe.bits) if "attn" in node.name else recipe.bits
        assert [a.i for a in node.attribute if a.name == "bits"] == [wanted], node.name
    assert all(a.i == recipe.block_size for n in graph.node for a in n.attribute if a.name == "block_size")
    # merged q/k/v and gate/up (the Llama family's default fusions): 4 quantized matrices a layer
    assert len(layers) == 4 * manifest.num_layers


def test_quant_block_size_sets_every_blocks_width_and_is_recorded(tiny_checkpoint, tmp_path):
    export_bundle(tiny_checkpoint("llama", DIRECT), tmp_path / "b",
                  options=ExportOptions(quantize="int8", quant_block_size=16, score_graph=False), log=_quiet)
    manifest = read_manifest(tmp_path / "b")
    assert manifest.validation["passed"]
    assert manifest.variant["quantization"] == {**QUANTIZATIONS["int8"].to_dict(), "block_size": 16}
    graph = onnx.load(str(tmp_path / "b" / "decode_exits.onnx"), load_external_data=False).graph
    sizes = [a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"]
    assert sizes and set(sizes) == {16}


@pytest.mark.parametrize("fields", [dict(quantize="int8", quant_block_size=24), dict(quantize="int4", quant_block_size=8),
                                    dict(quant_block_size=16)])
def test_bad_quant_block_sizes_are_refused(fields):
    from autocontrast.errors import ExportError

    with pytest.raises(ExportError, match="--quant-block-size"):
        ExportOptions(**fields)
