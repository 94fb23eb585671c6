"""What acd-bench does not say about the CUDA path, for the real model: onnxruntime's build and
providers, whether the KV cache stays on the device between steps, and whether CUDA (fp32, fp16)
picks the same greedy tokens as the CPU. Torch-free, like the runtime: the CUDA libraries must load
through LD_LIBRARY_PATH (scripts/gpu_check.sh sets it), not because torch loaded them first.

    python scripts/gpu_probe.py smollm2 --fp32 BUNDLE [--fp16 BUNDLE] --text FILE --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from autocontrast.config import MultiExitConfiguration
from autocontrast.runtime import Generator

MODES = {"original": MultiExitConfiguration(),
         "acd": MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(30, 15))}
NEW_TOKENS = 32


def onnxruntime_build() -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {"version": ort.__version__, "file": ort.__file__,
                            "providers": ort.get_available_providers()}
    try:
        from onnxruntime.capi import build_and_package_info as build

        info.update(package=build.package_name, cuda_version=getattr(build, "cuda_version", None))
    except ImportError:
        pass
    return info


def kv_cache_devices(generator: Generator, prompts: list[list[int]], steps: int = 4) -> list[str]:
    """Device of every past key/value after `steps` decode steps of the ACD graph (the runtime's loop)."""
    from autocontrast.runtime.decode_state import DecodeState

    state = DecodeState(generator.session(generator.mode(MODES["acd"]).graph), pad_token_id=generator.pad_token_id)
    out = state.extend(prompts)
    for _ in range(steps):
        out = state.advance(out.exit_logits[:, 0].argmax(-1))  # (batch,)
    return sorted(state.cache.devices())


def greedy(generator: Generator, prompts: list[list[int]]) -> dict[str, list[list[int]]]:
    return {name: generator.generate(prompts, multi_exit=config, max_new_tokens=NEW_TOKENS,
                                     ignore_eos=True).token_ids for name, config in MODES.items()}


def agreement(reference: dict[str, list[list[int]]], other: dict[str, list[list[int]]]) -> dict[str, Any]:
    """Per mode: tokens equal to the reference, out of all, and where each row first differs."""
    found = {}
    for mode, rows in reference.items():
        equal = total = 0
        first = []
        for want, got in zip(rows, other[mode], strict=True):
            same = [a == b for a, b in zip(want, got, strict=True)]
            equal, total = equal + sum(same), total + len(same)
            first.append(same.index(False) if False in same else None)
        found[mode] = {"equal_tokens": equal, "tokens": total, "first_difference": first}
    return found


def probe_smollm2(args: argparse.Namespace) -> dict[str, Any]:
    from autocontrast.bench.cli import Scenario, real_prompts

    prompts = real_prompts(args.text, args.fp32 / "tokenizer.json", Scenario(16, NEW_TOKENS, 2))
    result: dict[str, Any] = {"onnxruntime": onnxruntime_build(), "prompts": prompts, "new_tokens": NEW_TOKENS}
    tokens = {}
    for label, bundle, provider in (("fp32-cpu", args.fp32, "cpu"), ("fp32-cuda", args.fp32, "cuda"),
                                    ("fp16-cuda", args.fp16, "cuda")):
        if bundle is None:
            continue
        started = time.perf_counter()
        try:
            generator = Generator(bundle, provider=provider, preload=tuple(MODES.values()))
            entry: dict[str, Any] = {"session_providers": generator.session(
                generator.mode(MODES["acd"]).graph).session.get_providers()}
            if provider != "cpu":
                entry["kv_cache_devices"] = kv_cache_devices(generator, prompts)
            tokens[label] = greedy(generator, prompts)
            entry["tokens"] = tokens[label]
        except Exception as err:  # record it and go on: the other configurations still say something
            entry = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=3)}
        entry["seconds"] = round(time.perf_counter() - started, 1)
        result[label] = entry
        print(f"{label}: {json.dumps({k: v for k, v in entry.items() if k not in ('tokens', 'traceback')})}",
              flush=True)
    if "fp32-cpu" in tokens and "fp32-cuda" in tokens:
        result["fp32_cuda_vs_cpu"] = agreement(tokens["fp32-cpu"], tokens["fp32-cuda"])
    if "fp32-cuda" in tokens and "fp16-cuda" in tokens:
        result["fp16_vs_fp32_cuda"] = agreement(tokens["fp32-cuda"], tokens["fp16-cuda"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("smollm2", help="probe the SmolLM2 bundles on CPU and CUDA")
    s.add_argument("--fp32", type=Path, required=True)
    s.add_argument("--fp16", type=Path)
    s.add_argument("--text", type=Path, required=True, help="text the prompts are cut from")
    s.add_argument("--json", type=Path, required=True, help="where to write the findings")
    args = p.parse_args(argv)
    result = probe_smollm2(args)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for key in ("fp32_cuda_vs_cpu", "fp16_vs_fp32_cuda"):
        if key in result:
            print(f"{key}: {json.dumps(result[key])}")
    failed = [k for k in ("fp32-cpu", "fp32-cuda", "fp16-cuda") if "error" in result.get(k, {})]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
