"""The multi-exit PyTorch model on the real SmolLM2-135M-Instruct, shared direct projection, exits
(10, 15, 20, 30): the top exit is the original head, ACD differs from greedy and is deterministic,
and its first-step scores are DESIGN.md's formula (float64, computed here from the hidden states)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from autocontrast.config import MultiExitConfiguration
from autocontrast.models.auto import AutoMultiExitModel
from tests.models.numpy_contrast import reference_contrast

pytestmark = pytest.mark.slow

EXITS = (10, 15, 20, 30)
PROMPT = "The history of the city of Paris"
NEW_TOKENS = 24


def _config(**fields) -> MultiExitConfiguration:
    return MultiExitConfiguration(vocab_projection_mode="SHARED_PROJECTION_DIRECT", lm_head_layer_indices=EXITS,
                                  **fields)


@pytest.fixture(scope="module")
def model(smollm2_path):
    return AutoMultiExitModel.from_pretrained(smollm2_path, _config())


@pytest.fixture(scope="module")
def prompt_ids(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)(PROMPT, return_tensors="pt").input_ids


def _generate(model, ids, config):
    model.multi_exit_config = config
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, pad_token_id=2)
    return out[0, ids.shape[1]:].tolist()


def test_top_exit_generates_exactly_what_the_original_head_generates(model, prompt_ids):
    original = _generate(model, prompt_ids, _config())
    top = _generate(model, prompt_ids, _config(use_original_head=False, output_layer_index=30))
    assert top == original and len(original) > 8


def test_acd_differs_from_greedy_and_is_deterministic(model, prompt_ids):
    acd = _config(use_original_head=False, contrast_layer_indices=(30, 15))
    first, second = _generate(model, prompt_ids, acd), _generate(model, prompt_ids, acd)
    assert first == second
    assert first != _generate(model, prompt_ids, _config())


def test_first_step_scores_are_the_design_formula(model, prompt_ids):
    model.multi_exit_config = _config(use_original_head=False, contrast_layer_indices=(30, 15))
    with torch.inference_mode():
        scores = model(input_ids=prompt_ids).logits[0, -1].double().numpy()  # (vocab,)
        hidden = model.model(input_ids=prompt_ids, output_hidden_states=True).hidden_states
        head = model.lm_head.weight.double()  # (vocab, hidden), tied to the embeddings
        upper = (hidden[30][0, -1].double() @ head.T).numpy()  # top layer: HF already applied the final norm
        lower = (model.model.norm(hidden[15])[0, -1].double() @ head.T).numpy()
    expected = reference_contrast(upper, lower, alpha=0.1, k=1)
    finite = np.isfinite(expected)
    assert np.array_equal(finite, np.isfinite(scores))
    np.testing.assert_allclose(scores[finite], expected[finite], rtol=0, atol=1e-4)
    assert np.argmax(scores) == np.argmax(expected)
