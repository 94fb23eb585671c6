"""The ACD contrast in NumPy: the runtime's implementation, held equal to the torch one by a test.

See `autocontrast.models.contrast` for the formula; this mirrors it operation for operation.

>>> import numpy as np
>>> u, l = np.array([[2.0, 1.0, 0.0]]), np.array([[2.0, 0.0, 0.0]])
>>> float(np.exp(contrast_scores(u, l)).sum())
1.0
"""

from __future__ import annotations

import numpy as np

from autocontrast.config import DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES, DEFAULT_RELATIVE_TOP


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis; rows of all -inf give -inf, not NaN."""
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    shifted = x - top
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def contrast_scores(upper: np.ndarray, lower: np.ndarray, *, alpha: float = DEFAULT_ALPHA,
                    minimum_candidates: int = DEFAULT_MINIMUM_CANDIDATES) -> np.ndarray:
    """Contrast scores (log-probabilities): (..., vocab), (..., vocab) -> (..., vocab).

    Computed in float32 (float64 if given float64).
    """
    dtype = np.result_type(upper.dtype, np.float32)
    log_pu = log_softmax(upper.astype(dtype, copy=False))  # (..., vocab)
    log_pl = log_softmax(lower.astype(dtype, copy=False))  # (..., vocab)
    pu = np.exp(log_pu)

    top = pu.max(axis=-1, keepdims=True)  # (..., 1)
    kth = -np.partition(-pu, minimum_candidates - 1, axis=-1)[..., minimum_candidates - 1:minimum_candidates]
    threshold = np.minimum(top * dtype.type(alpha), kth)
    plausible = pu >= threshold  # (..., vocab)

    with np.errstate(invalid="ignore"):
        scores = log_pu - log_pl
    scores = _infinite_takes_all(np.where(np.isnan(scores) | ~plausible, -np.inf, scores)).astype(dtype, copy=False)

    mass = np.where(plausible, pu, 0.0).sum(axis=-1, keepdims=True)  # (..., 1)
    # log(softmax(s) * mass) in log space: a candidate whose share underflows keeps a finite score
    with np.errstate(divide="ignore"):
        redistributed = log_softmax(scores) + np.log(mass)
    return np.where(plausible, redistributed, log_pu).astype(dtype, copy=False)


def jensen_shannon(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """JSD(p || q) in nats over the last axis, from log-probabilities (0 log 0 = 0): (..., vocab) -> (...).

    Summed per token as p (log p - log m) + q (log q - log m) with m = (p + q) / 2: each term is small
    where p and q agree, so nothing cancels (a difference of entropies loses the float32 digits that
    tell close candidates apart). A zero probability (0 * -inf) adds nothing: rows where one occurs are
    summed again without those terms."""
    p, q = np.exp(log_p), np.exp(log_q)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_m = np.log((p + q) * p.dtype.type(0.5))
        terms = p * (log_p - log_m)
        terms += q * (log_q - log_m)
    out = terms.sum(axis=-1)
    bad = np.isnan(out)
    if bad.any():
        out = np.where(bad, np.nan_to_num(terms, nan=0.0).sum(axis=-1), out)
    return out * 0.5


def dola_scores(final: np.ndarray, premature: np.ndarray, *, relative_top: float = DEFAULT_RELATIVE_TOP) -> np.ndarray:
    """DoLa scores: (..., vocab) mature logits, (candidates, ..., vocab) premature logits -> (..., vocab).

    The formula is `autocontrast.models.contrast.dola_scores`'; float32 (float64 if given float64).
    """
    dtype = np.result_type(final.dtype, np.float32)
    log_final = log_softmax(final.astype(dtype, copy=False))  # (..., vocab)
    log_premature = log_softmax(premature.astype(dtype, copy=False))  # (candidates, ..., vocab)
    if len(log_premature) == 1:
        base = log_premature[0]
    else:
        chosen = jensen_shannon(log_final[None], log_premature).argmax(axis=0)  # (...): the first on ties
        base = np.take_along_axis(log_premature, chosen[None, ..., None], axis=0)[0]
    kept = log_final >= log_final.max(axis=-1, keepdims=True) + dtype.type(np.log(relative_top))
    with np.errstate(invalid="ignore"):
        scores = np.where(kept, log_final - base, dtype.type(-np.inf))
    return _infinite_takes_all(scores).astype(dtype, copy=False)


def _infinite_takes_all(scores: np.ndarray) -> np.ndarray:
    """A lower exit's log-probability of -inf on a candidate makes its score +inf: in the limit those tokens take
    the whole choice (0 each, every other token -inf) in their row; rows without one are unchanged."""
    infinite = scores == np.inf
    if not infinite.any():
        return scores
    return np.where(infinite.any(axis=-1, keepdims=True), np.where(infinite, 0.0, -np.inf), scores)
