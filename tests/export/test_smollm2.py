"""SmolLM2-135M-Instruct (shared direct exits, contrast 30 vs 15 fused): the bundle validates, an ACD
greedy decode driven by ONNX Runtime yields the PyTorch model's tokens, and the int8 variant runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autocontrast.bundle import CONTRAST_OUTPUT, DECODE_EXITS, DECODE_ORIGINAL, read_manifest
from autocontrast.config import MultiExitConfiguration
from autocontrast.models.auto import AutoMultiExitModel
from tests.export.ort_loop import GraphRunner

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "Once upon a time, a little robot")
NEW_TOKENS = 32
INT8_EXPORT = dict(projection="SHARED_PROJECTION_DIRECT", exits=(30, 15), fuse_contrast=(30, 15),
                   score_graph=False, quantize="int8")


@pytest.fixture(scope="module")
def acd_model(smollm2_path):
    config = MultiExitConfiguration(vocab_projection_mode="SHARED_PROJECTION_DIRECT", use_original_head=False,
                                    contrast_layer_indices=(30, 15), alpha=0.1, minimum_candidates=1)
    return AutoMultiExitModel.from_pretrained(str(smollm2_path), config)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path))


@pytest.fixture(scope="session")
def smollm2_int8_bundle(smollm2_path):
    from autocontrast.export.cache import cached_bundle
    from autocontrast.export.exporter import ExportOptions

    return cached_bundle(smollm2_path, ExportOptions(**INT8_EXPORT), identity="smollm2-135m-instruct")


def _onnx_acd(bundle, ids: list[int], eos: set[int]) -> list[int]:
    runner = GraphRunner(bundle, DECODE_EXITS)
    out = runner.prefill(np.array([ids]), np.ones((1, len(ids)), np.int64))
    tokens: list[int] = []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(out[CONTRAST_OUTPUT][0]))
        tokens.append(token)
        if token in eos:
            break
        out = runner.step(np.array([token]))
    return tokens


def test_bundle_validates_within_fp32_tolerance(smollm2_bundle):
    manifest = read_manifest(smollm2_bundle)
    assert manifest.validation["passed"] is True
    assert manifest.validation["tolerance"]["logits"] <= 1e-3
    exits_graph = manifest.graph(DECODE_EXITS)
    assert exits_graph.exits[:2] == (30, 20) and exits_graph.contrast.upper == 30 and exits_graph.contrast.lower == 15
    assert manifest.graph(DECODE_ORIGINAL).exits == ("original",)
    assert manifest.special_tokens["eos_token_ids"] == [2] and manifest.chat_template


@pytest.mark.parametrize("prompt", PROMPTS)
def test_onnx_acd_greedy_decode_yields_the_pytorch_tokens(prompt, smollm2_bundle, acd_model, tokenizer):
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        generated = acd_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    expected = generated[0, len(ids):].tolist()
    assert _onnx_acd(smollm2_bundle, ids, eos={2}) == expected


def test_int8_variant_exports_runs_and_records_its_agreement(smollm2_int8_bundle, tokenizer):
    manifest = read_manifest(smollm2_int8_bundle)
    assert manifest.variant["quantize"] == "int8" and manifest.variant["quantization"]["bits"] == 8
    agreement = manifest.variant["agreement"]
    assert agreement["steps"] >= 64 and agreement["rate"] >= 0.9  # measured 94/96 when written
    tokens = _onnx_acd(smollm2_int8_bundle, tokenizer.encode(PROMPTS[0]), eos={2})
    assert len(tokens) > 0 and all(0 <= t < manifest.vocab_size for t in tokens)
