"""The torch contrast: batched and dtype behaviour. Its edge cases (and the NumPy contrast's) are one
table in tests/test_contrast_cases.py."""

from __future__ import annotations

import numpy as np
import torch

from autocontrast.models.contrast import calculate_contrasted_logits
from tests.models.numpy_contrast import reference_contrast

VOCAB = 257


def _logits(seed: int, shape=(VOCAB,), scale: float = 4.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0.0, scale, size=shape).astype(np.float32))


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


def test_float16_inputs_give_float32_scores():
    u, lo = _logits(9, (2, VOCAB)).half(), _logits(10, (2, VOCAB)).half()
    out = calculate_contrasted_logits(u, lo)
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    np.testing.assert_allclose(out.numpy(), reference_contrast(u.float().numpy(), lo.float().numpy()), atol=1e-4)
