"""Export at real model shapes: peak resident memory and wall time of `acd-export` (and `optimum-cli`).

For each shape: a random-weight folder of the real configuration (`acd-random-model`, cached under
--work), then each exporter under `/usr/bin/time -v`, one at a time (two exports side by side would
share the memory being measured). Prints a table and writes it as JSON.

    python benchmarks/export_shapes.py --shapes SmolLM2-360M,Llama-3.2-1B --optimum SmolLM2-360M \
        --out benchmarks/results/export-shapes.json

A shape name may be `real:DIR` for a real checkpoint folder (the converted SmolLM2), exported with
`--acd-args` as given.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
GB = 1e9


def timed(command: list[str]) -> dict[str, object]:
    """Run `command` under /usr/bin/time -v: its exit status, wall seconds and peak resident bytes."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    tail = [line for line in done.stdout.splitlines() + done.stderr.splitlines() if line.strip()][-40:]
    return {"command": " ".join(command), "returncode": done.returncode, "seconds": round(time.perf_counter() - started, 1),
            "peak_bytes": int(peak.group(1)) * 1024 if peak else None, "log_tail": tail}


def weight_bytes(folder: Path) -> int:
    from autocontrast.export.checkpoint import model_config
    from autocontrast.export.memory import checkpoint_float32_bytes

    return checkpoint_float32_bytes(str(folder), model_config(str(folder)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", required=True, help="comma-separated acd-random-model names or real:DIR")
    parser.add_argument("--optimum", default="", help="shapes (as named in --shapes) to export with optimum-cli too")
    parser.add_argument("--acd-args", default="", help="extra acd-export arguments for real:DIR checkpoints")
    parser.add_argument("--export-args", default="", help="extra acd-export arguments for every shape "
                        "(for example --no-memory-check)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/autocontrast-shapes"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep-bundles", action="store_true",
                        help="keep each acd-export bundle as WORK/bundle-NAME (for acd-bench) instead of removing it")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        if shape.startswith("real:"):
            folder, extra = Path(shape.removeprefix("real:")), args.acd_args.split()
        else:
            folder, extra = args.work / shape.lower(), []
            if not (folder / "config.json").is_file():
                subprocess.run([str(BIN / "acd-random-model"), shape, str(folder)], check=True)
        row: dict[str, object] = {"shape": shape, "float32_weight_bytes": weight_bytes(folder)}
        bundle = args.work / f"bundle-{folder.name}"
        shutil.rmtree(bundle, ignore_errors=True)
        print(f"== acd-export {shape}", file=sys.stderr, flush=True)
        row["acd_export"] = timed([str(BIN / "acd-export"), str(folder), str(bundle), *extra,
                                   *args.export_args.split()])
        if not args.keep_bundles:
            shutil.rmtree(bundle, ignore_errors=True)
        if shape in args.optimum.split(","):
            target = args.work / f"optimum-{folder.name}"
            shutil.rmtree(target, ignore_errors=True)
            print(f"== optimum-cli {shape}", file=sys.stderr, flush=True)
            row["optimum_cli"] = timed([str(BIN / "optimum-cli"), "export", "onnx", "--model", str(folder),
                                        "--task", "text-generation-with-past", str(target)])
            shutil.rmtree(target, ignore_errors=True)
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                        "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print("| model | float32 weights | acd-export peak | time | optimum-cli peak | time |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = [row["shape"], f"{row['float32_weight_bytes'] / GB:.2f} GB"]
        for key in ("acd_export", "optimum_cli"):
            run = row.get(key)
            if run is None:
                cells += ["not run", ""]
            elif run["returncode"] != 0:
                cells += [f"failed ({run['returncode']})", f"{run['seconds']} s"]
            else:
                cells += [f"{run['peak_bytes'] / GB:.2f} GB", f"{run['seconds']:.0f} s"]
        print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
