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


def reference_dola_row(final: np.ndarray, premature: list[np.ndarray], *, relative_top: float = 0.1
                       ) -> tuple[np.ndarray, int]:
    """DoLa at one position, from the paper (Chuang et al. 2023, eq. 2-4), float64: the candidate with the
    largest Jensen-Shannon divergence from the mature distribution (scipy's, squared: scipy returns its
    square root), then log q_N - log q_M on tokens with q_N >= relative_top * max q_N, -inf elsewhere.
    Returns (scores, index of the chosen candidate)."""
    from scipy.spatial.distance import jensenshannon

    log_final = _log_softmax(final)
    divergences = [jensenshannon(np.exp(log_final), np.exp(_log_softmax(p))) ** 2 for p in premature]
    chosen = int(np.argmax(divergences))
    log_base = _log_softmax(premature[chosen])
    probabilities = np.exp(log_final)
    kept = probabilities >= relative_top * probabilities.max()
    return np.where(kept, log_final - log_base, -np.inf), chosen
