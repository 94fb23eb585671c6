"""Summary statistics of timed runs: medians, p90, spread. Pure functions over lists of seconds."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class RunTiming:
    """One generation call: when each output step finished, relative to the call's start (seconds).

    step_ends[0] is the time to first token; step_ends[i] - step_ends[i-1] the time of output token i.
    `tokens`: the generated ids of each row (empty where a system does not report them), so the
    driver can check that systems running the same search agree.
    """

    step_ends: tuple[float, ...]
    batch: int
    tokens: tuple[tuple[int, ...], ...] = ()
    rss_peak_mib: float | None = None
    device_peak_mib: float | None = None

    @property
    def ttft(self) -> float:
        return self.step_ends[0]

    @property
    def per_token(self) -> np.ndarray:  # (steps - 1,)
        return np.diff(np.asarray(self.step_ends))

    @property
    def total(self) -> float:
        return self.step_ends[-1]


def token_rows(rows: Any) -> tuple[tuple[int, ...], ...]:
    """Generated ids per row (any nested sequence or 2-D array of ints) as hashable, picklable tuples."""
    return tuple(tuple(int(t) for t in row) for row in rows)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def summarise(runs: Sequence[RunTiming]) -> dict[str, float | None]:
    """Figures over the measured (non-warm-up) runs of one system in one scenario (times in ms)."""
    per_token = np.concatenate([r.per_token for r in runs]) if runs else np.array([])
    per_run_tpot = [float(np.median(r.per_token)) for r in runs if len(r.per_token)]
    ttfts = [r.ttft for r in runs]
    totals = [r.total for r in runs]
    new_tokens = len(runs[0].step_ends) * runs[0].batch if runs else 0
    ms = 1000.0
    return {
        "ttft_ms": percentile(ttfts, 50) * ms,
        "tpot_ms": percentile(per_token, 50) * ms,
        "tpot_p90_ms": percentile(per_token, 90) * ms,
        "tpot_spread_ms": (max(per_run_tpot) - min(per_run_tpot)) * ms if per_run_tpot else None,
        "e2e_ms": percentile(totals, 50) * ms,
        "tokens_per_s": new_tokens / percentile(totals, 50) if totals else None,
        "rss_peak_mib": max((r.rss_peak_mib or 0.0) for r in runs) or None if runs else None,
        "device_peak_mib": max((r.device_peak_mib or 0.0) for r in runs) or None if runs else None,
        "repeats": len(runs),
    }


def latency_by_position(runs: Sequence[RunTiming], *, bucket: int = 16) -> list[tuple[int, float]]:
    """Median per-token latency (ms) per bucket of output positions: the latency-vs-position curve."""
    if not runs:
        return []
    stacked = np.stack([r.per_token for r in runs])  # (runs, steps - 1)
    medians = np.median(stacked, axis=0)
    return [(start + 1, float(np.median(medians[start:start + bucket]) * 1000.0))
            for start in range(0, len(medians), bucket)]
