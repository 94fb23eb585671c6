"""`acd-bench --memory`: resident memory of one Generator serving several modes, against the weight bytes.

For each weights policy (each session loading its own, pre-packed weights; `share_weights=True`)
a fresh process opens a Generator on the bundle and generates once in the original head, the
one-exit mode (its early-exit graph when the bundle has one) and ACD, in that order; after each it
reads its memory from /proc: RSS (what the issue's target counts), anonymous and file-backed RSS,
and PSS (a file page mapped twice in one process counts once). Torch-free.

    acd-bench --bundle BUNDLE --memory [--contrast 30,15] [--exit 15]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import statistics
import sys
from pathlib import Path
from typing import Any

from autocontrast.bundle import weight_bytes
from autocontrast.errors import DataError

POLICIES = {"own": False, "shared": True}  # name -> Generator(share_weights=...)
PROMPT = "The history of Paris begins"
NEW_TOKENS = 16  # per generation; ms/token is the median step of the second of two generations per mode
MIB = 2**20


def process_memory() -> dict[str, float]:
    """This process's RSS, anonymous RSS, file-backed RSS and PSS, in MiB (Linux /proc)."""
    found: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    found[key] = int(value.split()[0]) / 1024
        with open("/proc/self/smaps_rollup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("Pss:"):
                    found["Pss"] = int(line.split()[1]) / 1024
    except OSError as err:
        raise DataError(f"--memory reads /proc (Linux): {err}") from None
    return found


def measure(bundle: str, share: bool, modes: list[tuple[str, Any]], new_tokens: int) -> list[dict[str, Any]]:
    """Rows of (mode, graph, memory after generating once in it, ms/token) in a fresh Generator."""
    from autocontrast.runtime import Generator

    rows = [{"mode": "opened", "graph": "-", **process_memory()}]
    generator = Generator(bundle, preload=(), share_weights=share)
    for name, config in modes:
        generator.generate(PROMPT, multi_exit=config, max_new_tokens=new_tokens, ignore_eos=True)
        steps = generator.generate(PROMPT, multi_exit=config, max_new_tokens=new_tokens, ignore_eos=True).timings
        rows.append({"mode": name, "graph": generator.mode(config).graph.name, **process_memory(),
                     "ms_per_token": steps.per_token_ms})
    return rows


def _child(conn: Any, *args: Any) -> None:
    try:
        conn.send(("ok", measure(*args)))
    except Exception as err:  # reported by the driver, which names the policy
        conn.send(("error", f"{type(err).__name__}: {err}"))


def _in_fresh_process(*args: Any, timeout: float) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_child, args=(child, *args), daemon=True)
    process.start()
    if not parent.poll(timeout):
        process.kill()
        raise DataError(f"the memory measurement did not finish within {timeout:.0f} s")
    status, detail = parent.recv()
    process.join(timeout=30)
    if status != "ok":
        raise DataError(f"the memory measurement failed: {detail}")
    return detail


def modes_of(bundle: Path, contrast: tuple[Any, ...] | None, exit_: Any) -> list[tuple[str, Any]]:
    """(label, configuration) of the original head, one exit and ACD (default: the bundle's fused contrast)."""
    from autocontrast.bench.systems import bundle_contrast
    from autocontrast.config import MultiExitConfiguration

    upper, lower = contrast or bundle_contrast(bundle)
    exit_ = lower if exit_ is None else exit_
    return [("original", MultiExitConfiguration()),
            (f"exit {exit_}", MultiExitConfiguration(use_original_head=False, output_layer_index=exit_)),
            (f"ACD {upper} vs {lower}", MultiExitConfiguration(use_original_head=False,
                                                              contrast_layer_indices=(upper, lower)))]


def table(results: dict[str, Any]) -> str:
    size = results["weight_bytes"] / MIB
    lines = [f"weights: {size:.0f} MiB ({results['bundle']})", "",
             "| weights | after generating in | graph | RSS MiB | RSS / weights | anon | file | PSS | ms/token |",
             "|---|---|---|---|---|---|---|---|---|"]
    for policy, rows in results["policies"].items():
        for r in rows:
            ms = f"{r['ms_per_token']:.1f}" if "ms_per_token" in r else "-"
            lines.append(f"| {policy} | {r['mode']} | {r['graph']} | {r['VmRSS']:.0f} | {r['VmRSS'] / size:.2f}x | "
                         f"{r['RssAnon']:.0f} | {r['RssFile']:.0f} | {r.get('Pss', float('nan')):.0f} | {ms} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """The `--memory` table of `acd-bench` (its --bundle, --contrast, --exit, --out, --timeout, --repeats)."""
    from autocontrast.bench import machine
    from autocontrast.bench.systems import exits_option

    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        raise DataError(f"{bundle} has no manifest.json; is it an export bundle?")
    contrast = exits_option(args.contrast) if args.contrast else None
    if contrast is not None and len(contrast) != 2:
        raise DataError(f"--contrast needs UPPER,LOWER, got {args.contrast!r}")
    modes = modes_of(bundle, contrast, exits_option(args.exit_)[0] if args.exit_ else None)
    results: dict[str, Any] = {
        "command": "acd-bench " + " ".join(argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": machine.describe(), "bundle": str(bundle), "weight_bytes": weight_bytes(bundle),
        "new_tokens": NEW_TOKENS, "repeats": args.repeats, "policies": {}}
    for repeat in range(args.repeats):
        for policy, share in POLICIES.items():
            print(f"measuring {policy} weights, run {repeat + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
            rows = _in_fresh_process(str(bundle), share, modes, NEW_TOKENS, timeout=args.timeout)
            results.setdefault("runs", []).append({"policy": policy, "rows": rows})
    for policy in POLICIES:  # medians over the fresh processes of each policy
        runs = [r["rows"] for r in results["runs"] if r["policy"] == policy]
        results["policies"][policy] = [
            {key: (statistics.median(run[i][key] for run in runs) if isinstance(value, float) else value)
             for key, value in row.items()} for i, row in enumerate(runs[0])]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(table(results))
    print(f"\nwrote {args.out / 'memory.json'}")
    return 0
