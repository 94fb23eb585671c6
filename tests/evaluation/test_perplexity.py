"""acd-perplexity: per-exit and contrast perplexities equal independent references (HF's own loss,
a float64 NumPy head, the NumPy contrast), and bad input is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from autocontrast.config import VocabularyProjectionMode
from autocontrast.errors import DataError, UnknownExitError
from autocontrast.evaluation.perplexity import main, perplexity_of_model

BLOCK = 32
TOKENS = 4 * BLOCK


@pytest.fixture(scope="module")
def text_file(wikitext_sample) -> Path:
    return wikitext_sample(4000)


@pytest.fixture(scope="module")
def heads_llama(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION)


@pytest.fixture(scope="module")
def report(heads_llama, text_file):
    return perplexity_of_model(heads_llama, [text_file], exits=(2, "original"), contrast=("original", 2),
                               block_size=BLOCK, max_tokens=TOKENS)


@pytest.fixture(scope="module")
def reference(heads_llama, text_file):
    """Blocks, HF hidden states and the exit-2 head, from the plain HF model and safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(heads_llama))(text_file.read_text(), add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[:TOKENS]).view(-1, BLOCK)  # (4, 32)
    model = AutoModelForCausalLM.from_pretrained(str(heads_llama)).eval()
    with torch.no_grad():
        out = model(blocks, labels=blocks, output_hidden_states=True)
        lower = model.model.norm(out.hidden_states[2]).double().numpy()  # (4, 32, hidden)
    head = load_file(str(heads_llama / "model.safetensors"))["name_to_lm_exit_head.lm_head_2.weight"].double().numpy()
    return blocks.numpy(), float(out.loss), out.logits.double().numpy(), lower @ head.T


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _perplexity(log_probs: np.ndarray, blocks: np.ndarray) -> float:
    targets = blocks[:, 1:, None]
    return math.exp(-np.take_along_axis(log_probs[:, :-1], targets, -1).mean())


def test_original_exit_perplexity_is_the_exponent_of_the_hf_loss(report, reference):
    _, hf_loss, _, _ = reference
    assert report.perplexities["original"] == pytest.approx(math.exp(hf_loss), rel=1e-4)


def test_exit_perplexity_matches_a_float64_numpy_head(report, reference):
    blocks, _, _, exit_logits = reference
    assert report.perplexities["2"] == pytest.approx(_perplexity(_log_softmax(exit_logits), blocks), rel=1e-4)


def test_contrast_perplexity_matches_the_numpy_contrast(report, reference):
    from autocontrast.runtime.contrast import contrast_scores

    blocks, _, upper, lower = reference
    expected = _perplexity(contrast_scores(upper, lower, alpha=0.1, minimum_candidates=1), blocks)
    assert report.perplexities["original_vs_2"] == pytest.approx(expected, rel=1e-4)


def test_report_counts_the_predicted_tokens(report):
    assert (report.blocks, report.tokens) == (4, 4 * (BLOCK - 1))


def test_exit_the_model_lacks_is_refused(heads_llama, text_file):
    with pytest.raises(UnknownExitError, match="not available"):
        perplexity_of_model(heads_llama, [text_file], exits=(2,), contrast=("original", 0), block_size=BLOCK,
                            max_tokens=TOKENS)


def test_cli_prints_a_table_and_writes_json(heads_llama, text_file, tmp_path, capsys):
    code = main([str(heads_llama), "--data", str(text_file), "--exits", "1,3", "--block-size", str(BLOCK),
                 "--max-tokens", str(TOKENS), "--json", str(tmp_path / "ppl.json")])
    assert code == 0
    assert set(json.loads((tmp_path / "ppl.json").read_text())["perplexities"]) == {"1", "3"}
    assert "perplexity" in capsys.readouterr().out


def test_cli_reports_a_missing_data_file(heads_llama, tmp_path, capsys):
    from autocontrast.cli_support import run_cli

    assert run_cli(main, [str(heads_llama), "--data", str(tmp_path / "none.txt")]) == 2
    assert "error: data file" in capsys.readouterr().err


def test_path_that_is_not_a_model_folder_is_a_data_error(tmp_path, text_file):
    with pytest.raises(DataError, match="no config.json"):
        perplexity_of_model(tmp_path, [text_file])


def test_bundle_perplexities_equal_the_pytorch_models(tiny_bundle, report, text_file):
    bundle = tiny_bundle("llama", VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION)
    from_bundle = perplexity_of_model(bundle, [text_file], exits=(2, "original"), contrast=("original", 2),
                                      block_size=BLOCK, max_tokens=TOKENS)
    assert (from_bundle.blocks, from_bundle.tokens) == (report.blocks, report.tokens)
    assert from_bundle.perplexities.keys() == report.perplexities.keys()
    for label, value in report.perplexities.items():
        assert from_bundle.perplexities[label] == pytest.approx(value, rel=1e-4), label


def test_bundle_without_the_exit_is_refused(tiny_bundle, text_file):
    bundle = tiny_bundle("llama", VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION)
    with pytest.raises(UnknownExitError):
        perplexity_of_model(bundle, [text_file], exits=(7,), block_size=BLOCK, max_tokens=TOKENS)
