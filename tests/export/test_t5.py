"""Tiny T5 (encoder-decoder) bundles in every projection mode match the Hugging Face forward of the
project's PyTorch T5, exit by exit: the encoder's cross-attention KV, a decoder prefill and cached
decode steps at batch 1 and at batch 3 with left-padded prompts, and the score graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from autocontrast.bundle import ENCODER, read_manifest
from autocontrast.config import VocabularyProjectionMode
from autocontrast.errors import ExportError
from autocontrast.export import ExportOptions, export_bundle
from autocontrast.models.contrast import calculate_contrasted_logits
from tests.runtime.conftest import CONTRAST
from tests.tiny_models import VOCAB, left_padded_prompts, multi_exit_model

MODES = tuple(VocabularyProjectionMode)
STEPS = 10  # past 8 positions: the decoder's relative-position buckets turn logarithmic there
ATOL = 1e-4


def _prompts(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(batch, 10) prompt ids and mask; rows after the first are left-padded."""
    return left_padded_prompts([10] if batch == 1 else [10, 6, 1], seed=batch)


class T5Runner:
    """Drives a bundle's encoder and one decoder graph by hand (independent of the exporter's validation)."""

    def __init__(self, bundle, graph: str):
        manifest = json.loads((bundle / "manifest.json").read_text())
        spec = next(g for g in manifest["graphs"] if g["name"] == graph)
        self.exits = [e if e == "original" else int(e) for e in spec["exits"]]
        self.contrast = spec["contrast"]["output"] if spec.get("contrast") else None
        kv = manifest["kv_cache"]
        self.layers, self.heads, self.head_dim = kv["num_layers"], kv["num_kv_heads"], kv["head_dim"]
        self.cross_names = [f"cross_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        self.start = manifest["encoder_decoder"]["decoder_start_token_id"]
        self.encoder = ort.InferenceSession(str(bundle / "encoder.onnx"), providers=["CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(bundle / spec["file"]), providers=["CPUExecutionProvider"])
        self.declared = {i.name for i in self.session.get_inputs()}

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        batch = ids.shape[0]
        cross = self.encoder.run(self.cross_names, {"input_ids": ids, "attention_mask": mask})
        self.fixed = {"encoder_attention_mask": mask, **dict(zip(self.cross_names, cross, strict=True))}
        self.past = [np.zeros((batch, self.heads, 0, self.head_dim), np.float32)] * (2 * self.layers)
        self.length = 0
        return self.step(np.full(batch, self.start, np.int64))

    def step(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        batch = len(tokens)
        self.length += 1
        names = ["exit_logits"] + ([self.contrast] if self.contrast else []) \
            + [f"present.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        feeds = {"input_ids": tokens[:, None], "attention_mask": np.ones((batch, self.length), np.int64),
                 "position_ids": np.full((batch, 1), self.length - 1, np.int64), **self.fixed,
                 **{f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}": p for i, p in enumerate(self.past)}}
        out = dict(zip(names, self.session.run(names, {k: v for k, v in feeds.items() if k in self.declared}),
                       strict=True))
        self.past = [out[n] for n in names[len(names) - 2 * self.layers:]]
        return out


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_every_exit_matches_pytorch_over_cached_decode_steps(mode, batch, tiny_bundle, tiny_checkpoint):
    bundle = tiny_bundle("t5", mode, fuse_contrast=CONTRAST)
    model = multi_exit_model(tiny_checkpoint("t5", mode), mode)
    runners = [T5Runner(bundle, name) for name in ("decode_original", "decode_exits")]
    ids, mask = _prompts(batch)
    outs = [r.prefill(ids, mask) for r in runners]
    decoder = torch.zeros(batch, 1, dtype=torch.long)  # the start token
    cache = None
    for step in range(STEPS + 1):
        with torch.no_grad():  # the reference: the model's own forward, encoder included, HF cache
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        decoder_input_ids=decoder[:, -1:], past_key_values=cache, use_cache=True,
                        output_hidden_states=True)
            want = model.exit_logits(tuple(runners[1].exits) + ("original",), out.logits, out.decoder_hidden_states)
        cache = out.past_key_values
        for runner, got in zip(runners, outs, strict=True):
            for i, exit_ in enumerate(runner.exits):
                np.testing.assert_allclose(got["exit_logits"][:, i], want[exit_][:, -1].numpy(), atol=ATOL, rtol=0,
                                           err_msg=f"exit {exit_} of t5/{mode.name} at step {step}")
        contrast = calculate_contrasted_logits(want[CONTRAST[0]][:, -1], want[CONTRAST[1]][:, -1]).numpy()
        np.testing.assert_allclose(outs[1]["contrast_scores"], contrast, atol=ATOL, rtol=0)
        tokens = want["original"][:, -1].argmax(-1)  # both sides continue with the same tokens
        outs = [r.step(tokens.numpy()) for r in runners]
        decoder = torch.cat([decoder, tokens[:, None]], dim=1)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_score_graph_matches_pytorch_at_every_decoder_position(mode, tiny_bundle, tiny_checkpoint):
    bundle = tiny_bundle("t5", mode, fuse_contrast=CONTRAST)
    spec = read_manifest(bundle).graph("score")
    model = multi_exit_model(tiny_checkpoint("t5", mode), mode)
    ids, mask = _prompts(3)
    decoder = np.concatenate([np.zeros((3, 1), np.int64), np.random.default_rng(0).integers(3, VOCAB, (3, 11))], 1)
    runner = T5Runner(bundle, "decode_original")
    runner.prefill(ids, mask)
    score = ort.InferenceSession(str(bundle / spec.file), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": decoder, "attention_mask": np.ones_like(decoder), "position_ids":
             np.broadcast_to(np.arange(12), decoder.shape).copy(), **runner.fixed}
    declared = {i.name for i in score.get_inputs()}
    logits, contrast = score.run(["exit_logits", "contrast_scores"], {k: v for k, v in feeds.items() if k in declared})
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    decoder_input_ids=torch.from_numpy(decoder), output_hidden_states=True)
        by_exit = model.exit_logits(spec.exits, out.logits, out.decoder_hidden_states)
    for i, exit_ in enumerate(spec.exits):
        np.testing.assert_allclose(logits[:, :, i], by_exit[exit_].numpy(), atol=ATOL, rtol=0, err_msg=str(exit_))
    want = calculate_contrasted_logits(by_exit[CONTRAST[0]], by_exit[CONTRAST[1]]).numpy()
    np.testing.assert_allclose(contrast, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_manifest_says_encoder_decoder_and_records_every_graphs_validation(mode, tiny_bundle):
    manifest = read_manifest(tiny_bundle("t5", mode, fuse_contrast=CONTRAST))
    spec = manifest.encoder_decoder
    assert manifest.is_encoder_decoder and manifest.architecture == "t5"
    assert (spec.decoder_start_token_id, spec.num_layers, spec.encoder_layers) == (0, 4, 2)
    assert manifest.graph(spec.encoder_graph).kind == ENCODER
    assert [g.name for g in manifest.graphs] == ["encoder", "decode_original", "decode_exits", "score"]
    assert manifest.validation["passed"] is True
    assert set(manifest.validation["graphs"]) == {g.name for g in manifest.graphs}
    assert manifest.validation["graphs"]["encoder"]["cross_key_values.*"] < 1e-3


def test_no_graph_has_an_if_node_and_the_encoder_emits_every_layers_cross_kv(tiny_bundle):
    bundle = tiny_bundle("t5", VocabularyProjectionMode.SHARED_PROJECTION_DIRECT, fuse_contrast=CONTRAST)
    manifest = read_manifest(bundle)
    for g in manifest.graphs:
        graph = onnx.load(str(bundle / g.file), load_external_data=False).graph
        assert "If" not in {n.op_type for n in graph.node}, f"{g.name} has an If node (TensorRT rejects it)"
    encoder = onnx.load(str(bundle / "encoder.onnx"), load_external_data=False).graph
    assert [o.name for o in encoder.output] == manifest.encoder_decoder.cross_names()


def test_cli_exports_chosen_exits_with_original_as_fused_upper(tiny_checkpoint, tmp_path):
    from autocontrast.export.cli import main

    checkpoint = tiny_checkpoint("t5", VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION)
    assert main([str(checkpoint), str(tmp_path / "b"), "--exits", "2", "--fuse-contrast", "original,2",
                 "--no-score-graph", "--quiet"]) == 0
    manifest = read_manifest(tmp_path / "b")
    exits_graph = manifest.graph("decode_exits")
    assert set(exits_graph.exits) == {2, "original"} and exits_graph.contrast.upper == "original"
    assert [g.name for g in manifest.graphs] == ["encoder", "decode_original", "decode_exits"]


@pytest.mark.parametrize("flag", [dict(quantize="int8"), dict(optimize=True)],
                         ids=lambda f: next(iter(f)))
def test_variants_not_built_for_t5_are_refused_before_any_work(flag, tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("t5", VocabularyProjectionMode.SHARED_PROJECTION_DIRECT)
    with pytest.raises(ExportError, match="not supported for encoder-decoder"):
        export_bundle(checkpoint, tmp_path / "b", options=ExportOptions(**flag), log=lambda _m: None)
    assert list(tmp_path.iterdir()) == []
