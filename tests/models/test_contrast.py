"""The torch contrast: DESIGN.md's formula, numerically safe, batched, and replaceable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autocontrast.models.contrast import calculate_contrasted_logits
from tests.models.numpy_contrast import reference_contrast

VOCAB = 257


def _logits(seed: int, shape=(VOCAB,), scale: float = 4.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0.0, scale, size=shape).astype(np.float32))


@pytest.mark.parametrize("alpha,k", [(0.1, 1), (0.5, 1), (0.1, 5), (0.001, 1), (1.0, 3), (0.0, 1)])
def test_contrast_equals_the_float64_numpy_formula(alpha, k):
    u, lo = _logits(1, (4, VOCAB)), _logits(2, (4, VOCAB))
    got = calculate_contrasted_logits(u, lo, minimum_candidates=k, alpha=alpha).numpy()
    want = reference_contrast(u.numpy(), lo.numpy(), alpha=alpha, k=k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_contrast_changes_the_ranking_inside_the_candidate_set():
    u = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    lo = torch.tensor([[5.0, 0.0, 0.0, 0.0]])  # the lower exit is sure of token 0: the contrast prefers token 1
    out = calculate_contrasted_logits(u, lo)
    assert int(out.argmax()) == 1 and int(u.argmax()) == 0


def test_contrast_is_log_probabilities_that_keep_the_upper_mass():
    out = calculate_contrasted_logits(_logits(3, (2, VOCAB)), _logits(4, (2, VOCAB)))
    np.testing.assert_allclose(out.exp().sum(-1).numpy(), [1.0, 1.0], atol=1e-5)


def test_batch_result_equals_per_row_results():
    u, lo = _logits(5, (3, 6, VOCAB)), _logits(6, (3, 6, VOCAB))
    batched = calculate_contrasted_logits(u, lo, minimum_candidates=2)
    for b in range(3):
        for t in range(6):
            row = calculate_contrasted_logits(u[b, t], lo[b, t], minimum_candidates=2)
            torch.testing.assert_close(batched[b, t], row, rtol=0, atol=1e-6)


def test_minimum_candidates_widens_the_candidate_set():
    u = torch.tensor([[10.0, 0.0, -1.0, -2.0, -3.0]])  # alone, token 0 is the only plausible one
    lo = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0]])
    one = calculate_contrasted_logits(u, lo, minimum_candidates=1)
    three = calculate_contrasted_logits(u, lo, minimum_candidates=3)
    torch.testing.assert_close(one, torch.log_softmax(u, -1))  # A = {0}: q = pu there, pu elsewhere
    np.testing.assert_allclose(three.numpy(), reference_contrast(u.numpy(), lo.numpy(), k=3), atol=1e-5)
    assert not torch.allclose(one[0, :3], three[0, :3])


def test_tied_upper_probabilities_at_the_threshold_are_all_candidates():
    u = torch.tensor([[2.0, 1.0, 1.0, 1.0, -5.0]])
    lo = torch.tensor([[0.0, 3.0, 2.0, 1.0, 0.0]])
    out = calculate_contrasted_logits(u, lo, minimum_candidates=2, alpha=1.0)  # t = 2nd largest, tied 3 ways
    want = reference_contrast(u.numpy(), lo.numpy(), alpha=1.0, k=2)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5)
    assert out[0, 1] < out[0, 2] < out[0, 3]  # the tied tokens are all in A, ranked by the contrast


def test_no_nan_for_minus_inf_upper_logits():
    u = _logits(7, (2, VOCAB))
    u[:, 10:100] = float("-inf")  # masked tokens (e.g. a bad-words processor)
    lo = _logits(8, (2, VOCAB))
    out = calculate_contrasted_logits(u, lo)
    assert not torch.isnan(out).any()
    assert torch.isneginf(out[:, 10:100]).all()
    finite = u.clone()
    finite[:, 10:100] = -1e4  # the same distribution with probabilities that underflow
    np.testing.assert_allclose(out[:, :10].numpy(), reference_contrast(finite.numpy(), lo.numpy())[:, :10], atol=1e-5)


def test_no_nan_for_minus_inf_lower_logits_inside_the_candidate_set():
    u = torch.tensor([[2.0, 1.9, 0.0, -4.0]])
    lo = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]])
    out = calculate_contrasted_logits(u, lo)
    assert not torch.isnan(out).any()
    assert int(out.argmax()) == 1  # a token the lower exit rules out entirely wins the contrast
    assert float(out.exp().sum()) == pytest.approx(1.0, abs=1e-5)


def test_no_nan_when_probabilities_underflow():
    u = torch.tensor([[0.0, -0.1, -200.0, -300.0]])
    lo = torch.tensor([[0.0, -300.0, -200.0, 0.0]])  # pl of the candidate token 1 underflows to 0 in float32
    out = calculate_contrasted_logits(u, lo)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), reference_contrast(u.numpy(), lo.numpy()), rtol=1e-5, atol=1e-4)


def test_no_nan_when_alpha_is_zero_and_upper_probabilities_are_zero():
    u = torch.tensor([[0.0, float("-inf"), -1e4]])  # t = 0: every token, even those of zero mass, is in A
    lo = torch.tensor([[0.0, 0.0, float("-inf")]])
    out = calculate_contrasted_logits(u, lo, alpha=0.0)
    assert not torch.isnan(out).any()
    assert float(out.exp().sum()) == pytest.approx(1.0, abs=1e-5)


def test_float16_inputs_give_float32_scores():
    u, lo = _logits(9, (2, VOCAB)).half(), _logits(10, (2, VOCAB)).half()
    out = calculate_contrasted_logits(u, lo)
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    np.testing.assert_allclose(out.numpy(), reference_contrast(u.float().numpy(), lo.float().numpy()), atol=1e-4)
