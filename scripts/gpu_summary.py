"""The GPU check's results as Markdown (RESULTS/summary.md): what ran, on what, and the tables the
README's GPU section takes. Reads what scripts/gpu_check.sh wrote; any file may be missing (a
partial run still gets a summary of what it has).

    python scripts/gpu_summary.py RESULTS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def steps_table(results: Path) -> list[str]:
    path = results / "steps.tsv"
    if not path.is_file():
        return ["(no steps.tsv)"]
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = ["| step | status | exit | note |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row + [""] * (4 - len(row))) + " |" for row in rows[1:]]
    return lines


def machine_lines(bench: dict[str, Any] | None, probe: dict[str, Any] | None) -> list[str]:
    lines = []
    if bench:
        m = bench.get("machine", {})
        gpus = ", ".join(f"{g.get('name')} ({g.get('memory')}, driver {g.get('driver')})" for g in m.get("gpus", []))
        lines.append(f"- GPU: {gpus or 'none reported'}; CPU: {m.get('cpu')} ({m.get('cores')} cores), "
                     f"Python {m.get('python')}")
        versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
        lines.append(f"- packages: {versions}; onnxruntime imported: {m.get('onnxruntime_imported')}")
    if probe and "onnxruntime" in probe:
        o = probe["onnxruntime"]
        lines.append(f"- onnxruntime imported: {o.get('package', '?')} {o.get('version')} (CUDA "
                     f"{o.get('cuda_version')} build), providers {', '.join(o.get('providers', []))}")
    return lines or ["(no benchmark or probe results yet)"]


def bench_table(bench: dict[str, Any]) -> list[str]:
    """Systems by scenario: median ms per output token (time to first token, ms)."""
    scenarios = bench["scenarios"]
    names = list(dict.fromkeys(n for s in scenarios for n in s["systems"]))
    head = "| system | " + " | ".join(f"prompt {s['prompt_tokens']}, batch {s['batch']}" for s in scenarios) + " |"
    lines = [head, "|---" * (len(scenarios) + 1) + "|"]
    for name in names:
        cells = []
        for s in scenarios:
            entry = s["systems"].get(name, {})
            f = entry.get("figures")
            cells.append(f"{f['tpot_ms']:.2f} ({f['ttft_ms']:.0f})" if f else f"skipped: {entry.get('skipped', '-')}"[:80])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"ms per output token (time to first token, ms); {bench.get('scenarios')[0]['new_tokens']} new tokens, "
                 f"median of {bench.get('repeats')} after {bench.get('warmup')} warm-up; `{bench.get('command')}`")
    return lines


def probe_lines(probe: dict[str, Any]) -> list[str]:
    lines = []
    for label in ("fp32-cpu", "fp32-cuda", "fp16-cuda"):
        entry = probe.get(label)
        if entry is None:
            continue
        if "error" in entry:
            lines.append(f"- {label}: ERROR {entry['error']}")
            continue
        where = f"; KV cache after 4 decode steps on: {', '.join(entry['kv_cache_devices'])}" \
            if "kv_cache_devices" in entry else ""
        lines.append(f"- {label}: session providers {', '.join(entry.get('session_providers', []))}{where}")
    for key, title in (("fp32_cuda_vs_cpu", "greedy tokens, fp32 CUDA vs fp32 CPU"),
                       ("fp16_vs_fp32_cuda", "greedy tokens, fp16 CUDA vs fp32 CUDA")):
        if key in probe:
            parts = [f"{mode} {v['equal_tokens']}/{v['tokens']} equal (first difference per prompt: "
                     f"{v['first_difference']})" for mode, v in probe[key].items()]
            lines.append(f"- {title}: " + "; ".join(parts))
    return lines


def pytest_line(results: Path) -> str:
    path = results / "pytest.txt"
    if not path.is_file():
        return "(pytest did not run)"
    tail = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.startswith("=")]
    return tail[-1].strip("= ") if tail else "(no pytest summary line)"


def summary(results: Path) -> str:
    bench = _load(results / "bench-cpu-cuda.json")
    fp16 = _load(results / "bench-fp16.json")
    probe = _load(results / "probe.json")
    out = ["# GPU check", "", *machine_lines(bench or fp16, probe), "", "## Steps", "", *steps_table(results), "",
           f"pytest -m gpu: {pytest_line(results)}", ""]
    if bench:
        out += ["## CPU vs CUDA, fp32: greedy (original head) vs ACD (30 vs 15, fused)", "", *bench_table(bench), ""]
    if fp16:
        out += ["## fp32 vs fp16 on CUDA", "", *bench_table(fp16), ""]
    if probe:
        out += ["## SmolLM2 on CUDA: KV cache and token agreement", "", *probe_lines(probe), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python scripts/gpu_summary.py RESULTS_DIR", file=sys.stderr)
        return 2
    results = Path(args[0])
    text = summary(results)
    (results / "summary.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
