"""An independent float64 NumPy reading of DESIGN.md's contrast formula, for tests only.

Written straight from the formula (not from autocontrast.runtime.contrast):
pu = softmax(u); pl = softmax(lo); t = min(alpha * max pu, k-th largest pu); A = {pu >= t};
s = log pu - log pl on A; q = softmax(s over A) * sum(pu over A); out = log q on A, log pu elsewhere.
"""

from __future__ import annotations

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def reference_contrast_row(u: np.ndarray, lo: np.ndarray, *, alpha: float = 0.1, k: int = 1) -> np.ndarray:
    """One position: (vocab,), (vocab,) -> (vocab,) float64, finite inputs."""
    log_pu, log_pl = _log_softmax(u), _log_softmax(lo)
    pu = np.exp(log_pu)
    threshold = min(alpha * pu.max(), np.sort(pu)[::-1][k - 1])
    in_a = pu >= threshold
    s = log_pu[in_a] - log_pl[in_a]
    q = np.exp(s - s.max()) / np.exp(s - s.max()).sum() * pu[in_a].sum()
    out = log_pu.copy()
    out[in_a] = np.log(q)
    return out


def reference_contrast(u: np.ndarray, lo: np.ndarray, *, alpha: float = 0.1, k: int = 1) -> np.ndarray:
    """Any leading shape: (..., vocab) -> (..., vocab), one row at a time."""
    u, lo = np.asarray(u, np.float64), np.asarray(lo, np.float64)
    flat_u, flat_l = u.reshape(-1, u.shape[-1]), lo.reshape(-1, lo.shape[-1])
    rows = [reference_contrast_row(a, b, alpha=alpha, k=k) for a, b in zip(flat_u, flat_l, strict=True)]
    return np.stack(rows).reshape(u.shape)
