"""acd-fit-cast: the fitted matrix is the least-squares solution (checked against NumPy on vectors
collected independently from the plain HF model), beats the direct projection, and the saved
checkpoint loads in SHARED_PROJECTION_CAST_OUTPUTS mode with its exit using the matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.data import wikitext_path
from autocontrast.errors import ConfigurationError, DataError
from autocontrast.models.auto import AutoMultiExitModel
from autocontrast.models.cast_fitting import fit_cast_matrices, fit_cast_matrix, main

VALID = wikitext_path("valid")
LAYERS = (1, 2)
BLOCK = 64
VECTORS = 1024  # 16 blocks of 64 tokens; hidden size 32


@pytest.fixture(scope="module")
def text_file(wikitext_sample) -> Path:
    return wikitext_sample(20_000)



@pytest.fixture(scope="module")
def fitted(plain_llama, text_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("cast") / "model"
    fits = fit_cast_matrices(plain_llama, output, layers=LAYERS, data_files=[text_file], block_size=BLOCK,
                             max_vectors=VECTORS)
    return output, fits


@pytest.fixture(scope="module")
def reference_vectors(plain_llama, text_file):
    """(layer -> norm(h_layer), h_top) from the plain HF model, float64 NumPy, no autocontrast code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(plain_llama))
    ids = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"][:VECTORS]
    model = AutoModelForCausalLM.from_pretrained(str(plain_llama)).eval()
    with torch.no_grad():
        hidden = model(torch.tensor(ids).view(-1, BLOCK), output_hidden_states=True).hidden_states
        xs = {k: model.model.norm(hidden[k]).reshape(-1, 32).double().numpy() for k in LAYERS}
        y = hidden[-1].reshape(-1, 32).double().numpy()  # HF's top hidden state: final norm applied
        assert torch.allclose(model.lm_head(hidden[-1]), model(torch.tensor(ids).view(-1, BLOCK)).logits, atol=1e-5)
    return xs, y


def test_fitted_matrix_is_the_least_squares_solution(fitted, reference_vectors):
    _, fits = fitted
    xs, y = reference_vectors
    for fit in fits:
        expected = np.linalg.lstsq(xs[fit.layer], y, rcond=None)[0].T  # C with x C^T ~ y
        np.testing.assert_allclose(fit.weight.double().numpy(), expected, rtol=1e-3, atol=1e-4)


def test_fitted_matrix_reconstructs_the_top_layer_better_than_the_direct_projection(fitted, reference_vectors):
    _, fits = fitted
    xs, y = reference_vectors
    for fit in fits:
        cast = np.linalg.norm(xs[fit.layer] @ fit.weight.double().numpy().T - y)
        direct = np.linalg.norm(xs[fit.layer] - y)
        assert cast < 0.95 * direct, (fit.layer, cast, direct)
        assert fit.cast_error == pytest.approx(cast / np.linalg.norm(y), rel=1e-4)


def test_saved_checkpoint_loads_in_cast_mode_and_its_exit_applies_the_matrix(fitted, reference_vectors, plain_llama):
    output, fits = fitted
    xs, _ = reference_vectors
    config = json.loads((output / "config.json").read_text())
    # the direct checkpoint's exits 1..4: 3 has no matrix and is dropped; 4 (the top) needs none
    assert config["lm_head_layer_indices"] == [*LAYERS, 4]
    mec = MultiExitConfiguration(vocab_projection_mode=VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS,
                                 use_original_head=False, output_layer_index=1)
    model = AutoMultiExitModel.from_pretrained(output, mec)  # no missing cast weights allowed
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(output))(VALID.read_text()[:2000], add_special_tokens=False)["input_ids"]
    batch = torch.tensor(ids[:BLOCK])[None]  # (1, 64)
    with torch.no_grad():
        logits = model(input_ids=batch).logits[0].double().numpy()  # (64, vocab): exit 1 through the cast
    x = xs[1][:BLOCK]  # the same tokens: the first block of the reference text
    embedding = model.lm_head.weight.detach().double().numpy()  # (vocab, hidden)
    expected = (x @ fits[0].weight.double().numpy().T) @ embedding.T
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)


def test_fitting_needs_at_least_as_many_vectors_as_dimensions():
    with pytest.raises(DataError, match="at least 32 tokens"):
        fit_cast_matrix(torch.randn(16, 32), torch.randn(16, 32))


def test_top_layer_needs_no_cast_matrix(plain_llama, text_file, tmp_path):
    with pytest.raises(ConfigurationError, match="layer 4 is the top"):
        fit_cast_matrices(plain_llama, tmp_path / "out", layers=(2, 4), data_files=[text_file])


def test_cli_reports_an_empty_data_file(plain_llama, tmp_path, capsys):
    from autocontrast.cli_support import run_cli

    (tmp_path / "empty.txt").write_text("")
    code = run_cli(main, [str(plain_llama), "--layers", "1", "--data", str(tmp_path / "empty.txt"),
                          "--output", str(tmp_path / "out")])
    assert code == 2
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cast_matrix_fitted_on_smollm2_beats_the_direct_projection_at_layer_15(smollm2_path):
    from transformers import AutoConfig, AutoTokenizer

    from autocontrast.evaluation.perplexity import TorchScorer, perplexity, text_blocks
    from autocontrast.models.cast_fitting import fit_all, load_for_fitting

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path))
    fit_blocks = text_blocks(tokenizer, [VALID], block_size=256, max_tokens=2048)  # (8, 256)
    test_blocks = text_blocks(tokenizer, [wikitext_path("test")], block_size=256, max_tokens=512)
    model = load_for_fitting(smollm2_path, AutoConfig.from_pretrained(str(smollm2_path)), (15,))
    (fit,) = fit_all(model, torch.from_numpy(fit_blocks), (15,))
    matrix = model.name_to_conv_matrix["15_to_30"].weight
    scorer = TorchScorer(model, (15,))
    with torch.no_grad():
        matrix.copy_(torch.eye(matrix.shape[0]))  # the identity cast is the direct projection
        direct = perplexity(scorer, test_blocks).perplexities["15"]
        matrix.copy_(fit.weight)
        cast = perplexity(scorer, test_blocks).perplexities["15"]
    assert fit.cast_error < fit.direct_error
    assert cast < direct / 2, (cast, direct)
