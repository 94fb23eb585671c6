"""One table of contrast edge cases, run over both implementations: the torch contrast (models,
traced into graphs) and the NumPy contrast (runtime). Each must equal an independent float64
reading of the formula (tests/models/numpy_contrast.py) where that is finite, never give NaN,
stay a log-probability distribution, and keep what the case says it must."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import torch

from autocontrast.models.contrast import calculate_contrasted_logits
from autocontrast.runtime.contrast import contrast_scores
from tests.models.numpy_contrast import reference_contrast

VOCAB = 257
INF = np.inf


def _torch(u: np.ndarray, lo: np.ndarray, alpha: float, k: int) -> np.ndarray:
    return calculate_contrasted_logits(torch.from_numpy(u), torch.from_numpy(lo), minimum_candidates=k,
                                       alpha=alpha).numpy()


def _numpy(u: np.ndarray, lo: np.ndarray, alpha: float, k: int) -> np.ndarray:
    return contrast_scores(u, lo, alpha=alpha, minimum_candidates=k)


IMPLEMENTATIONS: dict[str, Callable[..., np.ndarray]] = {"torch": _torch, "numpy": _numpy}


def _random(seed: int, shape=(2, VOCAB), scale: float = 4.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    upper: np.ndarray  # (rows, vocab)
    lower: np.ndarray
    alpha: float = 0.1
    k: int = 1
    reference: np.ndarray | None = None  # finite stand-in of `upper` for the float64 reference (None: upper)
    argmax: tuple[int, ...] | None = None  # the contrast's pick per row, where the case fixes it
    atol: float = 1e-5


def _masked_upper() -> Case:
    u, lo = _random(7), _random(8)
    finite = u.copy()
    u[:, 10:100] = -INF  # masked tokens (e.g. a bad-words processor): never candidates
    finite[:, 10:100] = -1e4  # the same distribution with probabilities that underflow
    return Case("minus_inf_upper_logits", u, lo, reference=finite)


def _lower_rules_out() -> Case:
    u = np.array([[2.0, 1.9, 0.0, -4.0]], np.float32)
    lo = np.array([[0.0, -INF, 0.0, -INF]], np.float32)
    return Case("minus_inf_lower_inside_candidates", u, lo, argmax=(1,))  # the token the lower exit rules out wins


CASES = [
    *[Case(f"random_alpha{a}_k{k}", _random(1, (4, VOCAB)), _random(2, (4, VOCAB)), alpha=a, k=k)
      for a, k in [(0.1, 1), (0.5, 1), (0.1, 5), (0.001, 1), (1.0, 3), (0.0, 1), (0.01, 20)]],
    Case("contrast_changes_ranking", np.array([[3.0, 2.9, 0.0, -1.0]], np.float32),
         np.array([[5.0, 0.0, 0.0, 0.0]], np.float32), argmax=(1,)),
    Case("one_candidate_keeps_upper", np.array([[10.0, 0.0, -1.0, -2.0, -3.0]], np.float32),
         np.array([[0.0, 5.0, 0.0, 0.0, 0.0]], np.float32), argmax=(0,)),
    Case("minimum_candidates_widens", np.array([[10.0, 0.0, -1.0, -2.0, -3.0]], np.float32),
         np.array([[0.0, 5.0, 0.0, 0.0, 0.0]], np.float32), k=3),
    Case("ties_at_threshold", np.array([[2.0, 1.0, 1.0, 1.0, -5.0]], np.float32),
         np.array([[0.0, 3.0, 2.0, 1.0, 0.0]], np.float32), alpha=1.0, k=2),
    Case("all_tied", np.zeros((1, VOCAB), np.float32), np.where(np.arange(VOCAB) % 2 == 0, 1.0, 0.0)
         .astype(np.float32)[None], k=2),
    _masked_upper(),
    _lower_rules_out(),
    Case("pl_underflows", np.array([[0.0, -0.1, -200.0, -300.0]], np.float32),
         np.array([[0.0, -300.0, -200.0, 0.0]], np.float32), atol=1e-4),
    Case("pu_underflows", np.array([[200.0, 199.0, 120.0] + [0.0] * 4], np.float32),
         np.array([[0.0, 150.0, -300.0] + [0.0] * 4], np.float32), alpha=1e-40, k=3, atol=1e-3),
    Case("alpha_zero_with_zero_mass", np.array([[0.0, -INF, -1e4]], np.float32),
         np.array([[0.0, 0.0, -INF]], np.float32), alpha=0.0),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_contrast_edge_case(case: Case, implementation: str):
    out = IMPLEMENTATIONS[implementation](case.upper, case.lower, case.alpha, case.k)
    assert out.shape == case.upper.shape and out.dtype == np.float32
    assert not np.isnan(out).any()
    np.testing.assert_allclose(np.exp(out.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    assert np.isneginf(out[np.isneginf(case.upper)]).all()  # zero upper mass stays zero
    if np.isfinite(case.lower).all() and np.isfinite(case.upper).all() or case.reference is not None:
        base = case.upper if case.reference is None else case.reference
        want = reference_contrast(base, case.lower, alpha=case.alpha, k=case.k)
        finite = np.isfinite(out)
        np.testing.assert_allclose(out[finite], want[finite], atol=case.atol, rtol=1e-5)
    if case.argmax is not None:
        assert tuple(out.argmax(-1)) == case.argmax


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_both_implementations_agree(case: Case):
    torch_out, numpy_out = (IMPLEMENTATIONS[n](case.upper, case.lower, case.alpha, case.k) for n in ("torch", "numpy"))
    np.testing.assert_array_equal(np.isneginf(torch_out), np.isneginf(numpy_out))
    finite = np.isfinite(torch_out)
    np.testing.assert_allclose(numpy_out[finite], torch_out[finite], atol=case.atol, rtol=1e-5)
    np.testing.assert_array_equal(numpy_out.argmax(-1), torch_out.argmax(-1))
