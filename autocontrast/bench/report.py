"""Benchmark output: the terminal table, the JSON file, and the PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
FIGURES = ("ttft_ms", "tpot_ms", "tpot_p90_ms", "tpot_spread_ms", "e2e_ms", "tokens_per_s", "rss_peak_mib")


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def add_ratios(results: dict[str, Any], baseline: str) -> None:
    """Per scenario, each system's per-token time and TTFT as a ratio to `baseline`'s (in place)."""
    for scenario in results["scenarios"]:
        base = scenario["systems"].get(baseline, {}).get("figures")
        for entry in scenario["systems"].values():
            figures = entry.get("figures")
            if figures and base and base.get("tpot_ms"):
                figures["tpot_ratio"] = figures["tpot_ms"] / base["tpot_ms"]
                figures["ttft_ratio"] = figures["ttft_ms"] / base["ttft_ms"] if base.get("ttft_ms") else None


def leading_agreement(rows: list[list[int]], reference: list[list[int]]) -> int | None:
    """How many leading tokens every row shares with the reference's same row (None: nothing to compare)."""
    if not rows or not reference or len(rows) != len(reference):
        return None
    shared = []
    for row, ref in zip(rows, reference, strict=True):
        n = 0
        while n < min(len(row), len(ref)) and row[n] == ref[n]:
            n += 1
        shared.append(n)
    return min(shared)


def add_agreement(results: dict[str, Any], reference: str) -> None:
    """Per scenario, each measured system's leading tokens in common with `reference` (first measured run, in place).

    Systems running the same greedy search at the same precision should agree on all tokens; quantized
    models and ACD part ways somewhere, and where is worth seeing next to their speed.
    """
    results["reference"] = reference
    for scenario in results["scenarios"]:
        ref = scenario["systems"].get(reference, {})
        ref_tokens = ref["runs"][0]["tokens"] if ref.get("runs") else []
        for entry in scenario["systems"].values():
            if not entry.get("figures"):
                continue
            tokens = entry["runs"][0]["tokens"] if entry.get("runs") else []
            entry["figures"]["agree_tokens"] = leading_agreement(tokens, ref_tokens)
            entry["figures"]["agree_of"] = len(tokens[0]) if tokens else None


def _agreement(figures: dict[str, Any]) -> str:
    if figures.get("agree_tokens") is None:
        return "-"
    return f"{figures['agree_tokens']}/{figures['agree_of']}"


def table(results: dict[str, Any]) -> str:
    """A plain-text table per scenario (times in ms, ratio to the named baseline, tokens shared with the reference)."""
    lines = []
    baseline = results.get("baseline")
    header = ("system", "TTFT", "ms/token", "p90", "spread", "e2e", "tok/s", "RSS MiB", f"x {baseline}", "agree")
    for scenario in results["scenarios"]:
        lines.append(f"\nscenario {scenario['name']}: prompt {scenario['prompt_tokens']} tokens, "
                     f"{scenario['new_tokens']} new tokens, batch {scenario['batch']}")
        rows = [header]
        for name, entry in scenario["systems"].items():
            f = entry.get("figures")
            if f is None:
                rows.append((name, f"skipped: {entry.get('skipped', '?')}") + ("",) * (len(header) - 2))
                continue
            rows.append((name, _fmt(f["ttft_ms"]), _fmt(f["tpot_ms"]), _fmt(f["tpot_p90_ms"]), _fmt(f["tpot_spread_ms"]),
                         _fmt(f["e2e_ms"], 0), _fmt(f["tokens_per_s"]), _fmt(f["rss_peak_mib"], 0),
                         _fmt(f.get("tpot_ratio"), 2), _agreement(f)))
        widths = [max(len(r[i]) for r in rows if len(r[1]) < 40 or i == 0) for i in range(len(header))]
        for row in rows:
            if row[1].startswith("skipped"):
                lines.append(f"  {row[0]:<{widths[0]}}  {row[1]}")
            else:
                lines.append("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def write_chart(results: dict[str, Any], path: Path) -> bool:
    """Per-token latency per system (bars) and latency vs output position (lines), one row per scenario.

    Returns False (and writes nothing) where matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = results["scenarios"]
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(13, 3.6 * len(scenarios)), squeeze=False)
    for row, scenario in enumerate(scenarios):
        measured = {n: e for n, e in scenario["systems"].items() if e.get("figures")}
        bar_ax, line_ax = axes[row]
        names = list(measured)
        values = [measured[n]["figures"]["tpot_ms"] for n in names]
        bars = bar_ax.barh(names, values, color=["#2b6cb0" if n.startswith("ours") else "#a0aec0" for n in names])
        bar_ax.bar_label(bars, fmt="%.1f", fontsize=8)
        bar_ax.invert_yaxis()
        bar_ax.set_xlabel("median ms per output token (lower is better)")
        bar_ax.set_title(f"{scenario['name']}: per-token latency", fontsize=10)
        for name, entry in measured.items():
            curve = entry.get("latency_by_position") or []
            if curve:
                line_ax.plot([p for p, _ in curve], [v for _, v in curve], label=name,
                             linestyle="-" if name.startswith("ours") else "--")
        line_ax.set_xlabel("output position")
        line_ax.set_ylabel("ms per token")
        line_ax.set_title(f"{scenario['name']}: latency vs position", fontsize=10)
        line_ax.legend(fontsize=7)
    machine = results.get("machine", {})
    fig.suptitle(f"acd-bench on {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores) {results.get('date', '')}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
