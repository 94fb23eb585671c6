"""The runtime's NumPy contrast equals the torch contrast (autocontrast.models.contrast), the one
traced into the graph, on random inputs in float32 and float64; the adversarial edge cases are one
table over both in tests/test_contrast_cases.py. Tests may import torch; the runtime may not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autocontrast.models.contrast import calculate_contrasted_logits
from autocontrast.runtime.contrast import contrast_scores

VOCAB = 257


def _both(upper: np.ndarray, lower: np.ndarray, **kw) -> tuple[np.ndarray, np.ndarray]:
    ours = contrast_scores(upper, lower, alpha=kw.get("alpha", 0.1), minimum_candidates=kw.get("k", 1))
    theirs = calculate_contrasted_logits(torch.from_numpy(upper), torch.from_numpy(lower),
                                         minimum_candidates=kw.get("k", 1), alpha=kw.get("alpha", 0.1)).numpy()
    return ours, theirs


def _assert_same(ours: np.ndarray, theirs: np.ndarray, atol: float = 1e-5) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("alpha,k", [(0.1, 1), (0.0, 1), (0.5, 3), (1.0, 1), (0.01, 20)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_logits_match_torch(alpha, k, dtype):
    rng = np.random.default_rng(int(alpha * 100) + k)
    upper = (rng.standard_normal((4, 3, VOCAB)) * 4).astype(dtype)  # (batch, seq, vocab)
    lower = (rng.standard_normal((4, 3, VOCAB)) * 4).astype(dtype)
    _assert_same(*_both(upper, lower, alpha=alpha, k=k))


def test_argmax_matches_torch_on_random_logits():
    rng = np.random.default_rng(7)
    upper = (rng.standard_normal((64, VOCAB)) * 3).astype(np.float32)
    lower = (rng.standard_normal((64, VOCAB)) * 3).astype(np.float32)
    ours, theirs = _both(upper, lower)
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_scores_are_log_probabilities_summing_to_one():
    rng = np.random.default_rng(3)
    upper, lower = rng.standard_normal((5, VOCAB)), rng.standard_normal((5, VOCAB))
    total = np.exp(contrast_scores(upper, lower, alpha=0.2, minimum_candidates=4)).sum(-1)
    np.testing.assert_allclose(total, 1.0, atol=1e-9)
