"""The ACD contrast in NumPy: the runtime's implementation, held equal to the torch one by a test.

See `autocontrast.models.contrast` for the formula; this mirrors it operation for operation.

>>> import numpy as np
>>> u, l = np.array([[2.0, 1.0, 0.0]]), np.array([[2.0, 0.0, 0.0]])
>>> float(np.exp(contrast_scores(u, l)).sum())
1.0
"""

from __future__ import annotations

import numpy as np

from autocontrast.config import DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES


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
    scores = np.where(np.isnan(scores) | ~plausible, -np.inf, scores)
    infinite = scores == np.inf
    any_infinite = infinite.any(axis=-1, keepdims=True)
    scores = np.where(any_infinite, np.where(infinite, 0.0, -np.inf), scores).astype(dtype, copy=False)

    mass = np.where(plausible, pu, 0.0).sum(axis=-1, keepdims=True)  # (..., 1)
    # log(softmax(s) * mass) in log space: a candidate whose share underflows keeps a finite score
    with np.errstate(divide="ignore"):
        redistributed = log_softmax(scores) + np.log(mass)
    return np.where(plausible, redistributed, log_pu).astype(dtype, copy=False)
