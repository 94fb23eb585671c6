"""TensorRT engines: real builds where a GPU and TensorRT exist (skipped elsewhere, saying why)."""

from __future__ import annotations

import pytest

from autocontrast.bundle import (
    ATTENTION_MASK,
    DECODE,
    DECODE_EXITS,
    INPUT_IDS,
    POSITION_IDS,
    SCORE,
    SCORE_GRAPH,
    GraphSpec,
    Manifest,
)
from autocontrast.export.tensorrt import missing_for_tensorrt, provider_options

MISSING = missing_for_tensorrt()


def test_profiles_cover_prefill_and_decode_for_every_dynamic_input():
    manifest = Manifest.example()
    graph = GraphSpec(DECODE_EXITS, "decode_exits.onnx", DECODE, (30, 15))
    options = provider_options(graph, manifest, max_batch=4, max_length=512, fp16=False)
    kv = manifest.kv_cache
    for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
        names = [item.split(":")[0] for item in options[key].split(",")]
        assert names == [INPUT_IDS, POSITION_IDS, ATTENTION_MASK] + kv.past_names()
    assert "past_key_values.0.key:1x3x0x64" in options["trt_profile_min_shapes"]  # prefill: empty past
    assert "input_ids:4x512" in options["trt_profile_max_shapes"]
    assert "past_key_values.29.value:4x3x511x64" in options["trt_profile_max_shapes"]
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"] == "trt_cache/decode_exits"


def test_score_graph_profiles_have_no_past():
    graph = GraphSpec(SCORE_GRAPH, "score.onnx", SCORE, (30, 15))
    options = provider_options(graph, Manifest.example(), max_batch=2, max_length=256, fp16=True)
    assert "past" not in options["trt_profile_max_shapes"] and options["trt_fp16_enable"] == "True"


@pytest.mark.gpu
@pytest.mark.skipif(bool(MISSING), reason="TensorRT engines need: " + "; ".join(MISSING))
def test_tensorrt_engines_are_built_and_recorded(tiny_checkpoint, tmp_path):
    from autocontrast.bundle import read_manifest
    from autocontrast.config import VocabularyProjectionMode
    from autocontrast.export import ExportOptions, export_bundle

    checkpoint = tiny_checkpoint("llama", VocabularyProjectionMode.SHARED_PROJECTION_DIRECT)
    export_bundle(checkpoint, tmp_path / "b", options=ExportOptions(tensorrt=True, trt_max_length=64))
    manifest = read_manifest(tmp_path / "b")
    recorded = manifest.variant["tensorrt"]["provider_options"]
    assert set(recorded) == {g.name for g in manifest.graphs}
    for options in recorded.values():
        assert any((tmp_path / "b" / options["trt_engine_cache_path"]).iterdir())
