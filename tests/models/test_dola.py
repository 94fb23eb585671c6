"""DoLa (Chuang et al. 2023) against an independent reading of the paper (tests/models/numpy_contrast.py,
scipy's Jensen-Shannon): the torch and NumPy implementations, the PyTorch multi-exit model's forward,
and the configuration that selects it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode, configuration_for_mode
from autocontrast.errors import ConfigurationError
from autocontrast.models.contrast import dola_scores as torch_dola
from autocontrast.runtime.contrast import dola_scores as numpy_dola
from tests.models.numpy_contrast import reference_dola_row

VOCAB = 211


def _logits(seed: int, shape, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, size=shape).astype(np.float32)


@pytest.mark.parametrize("relative_top", [0.1, 0.01, 0.5])
def test_torch_and_numpy_dola_equal_the_paper_per_row(relative_top):
    final, premature = _logits(1, (4, 5, VOCAB)), _logits(2, (3, 4, 5, VOCAB), scale=2.0)
    premature[1] *= 0.2  # a flat candidate: far from the mature layer, often the one chosen
    ours_torch = torch_dola(torch.from_numpy(final), torch.from_numpy(premature), relative_top=relative_top).numpy()
    ours_numpy = numpy_dola(final, premature, relative_top=relative_top)
    chosen = set()
    for b in range(4):
        for t in range(5):
            expected, which = reference_dola_row(final[b, t], [p[b, t] for p in premature], relative_top=relative_top)
            chosen.add(which)
            for ours in (ours_torch, ours_numpy):
                assert np.array_equal(np.isinf(ours[b, t]), np.isinf(expected))
                np.testing.assert_allclose(ours[b, t][np.isfinite(expected)], expected[np.isfinite(expected)],
                                           rtol=0, atol=2e-5)
    assert len(chosen) >= 2  # the rows did not all pick the same candidate: the selection was exercised


def test_one_candidate_is_a_fixed_premature_layer():
    final, premature = _logits(3, (2, VOCAB)), _logits(4, (1, 2, VOCAB))
    for b in range(2):
        expected, _ = reference_dola_row(final[b], [premature[0, b]])
        np.testing.assert_allclose(numpy_dola(final, premature)[b][np.isfinite(expected)],
                                   expected[np.isfinite(expected)], atol=2e-5)


def test_a_premature_minus_infinity_on_a_kept_token_takes_the_choice():
    final, premature = _logits(5, (VOCAB,)), _logits(6, (1, VOCAB))
    top = int(final.argmax())
    premature[0, top] = -np.inf
    for out in (numpy_dola(final, premature), torch_dola(torch.from_numpy(final), torch.from_numpy(premature)).numpy()):
        assert out[top] == 0.0 and np.isneginf(np.delete(out, top)).all()


def test_the_multi_exit_model_generates_with_dola_as_the_reference_chooses(tiny_checkpoint):
    from autocontrast.models.auto import AutoMultiExitModel

    direct = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT
    path = str(tiny_checkpoint("llama", direct))
    config = MultiExitConfiguration(vocab_projection_mode=direct, use_original_head=False, dola_layers=(1, 2, 3))
    model = AutoMultiExitModel.from_pretrained(path, config).eval()
    plain = AutoMultiExitModel.from_pretrained(path, MultiExitConfiguration(vocab_projection_mode=direct)).eval()
    ids = torch.tensor([[5, 17, 42, 9, 100, 7]])
    with torch.no_grad():
        scores = model(ids).logits[0]  # (seq, vocab)
        out = plain(ids, output_hidden_states=True)
        exits = plain.exit_logits(("original", 1, 2, 3), out.logits, out.hidden_states)
    for t in range(ids.shape[1]):
        expected, _ = reference_dola_row(exits["original"][0, t].numpy(), [exits[k][0, t].numpy() for k in (1, 2, 3)])
        finite = np.isfinite(expected)
        assert np.array_equal(finite, np.isfinite(scores[t].numpy()))
        np.testing.assert_allclose(scores[t].numpy()[finite], expected[finite], atol=5e-5)


@pytest.mark.parametrize("fields, message", [
    (dict(use_original_head=True, dola_layers=(3,)), "use_original_head=True"),
    (dict(use_original_head=False, dola_layers=(3,), output_layer_index=2), "mode of its own"),
    (dict(use_original_head=False, dola_layers=("original",)), "distinct layer indices"),
    (dict(use_original_head=False, dola_layers=(2, 2)), "distinct layer indices"),
    (dict(use_original_head=False, dola_layers=(2,), relative_top=0.0), "relative_top"),
])
def test_a_bad_dola_configuration_is_a_typed_error(fields, message):
    with pytest.raises(ConfigurationError, match=message):
        MultiExitConfiguration(**fields)


def test_dola_from_a_command_line():
    config = configuration_for_mode("dola", "10,15,20", relative_top=0.05)
    assert config.mode == "dola" and config.required_exits == ("original", 10, 15, 20)
    assert config.description == "dola_10_15_20" and config.relative_top == 0.05
    assert MultiExitConfiguration(use_original_head=False, dola_layers="8;15").dola_layers == (8, 15)
