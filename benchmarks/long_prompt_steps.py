"""A long prompt joining decoding rows, stepped in process: each step's time, and the prompt's time to first token.

The long-prompt scenario of `acd-bench-serve` without HTTP, clients or their share of the cores:
`--rows` rows decode WikiText-2 lines, then a prompt of `--long-words` words asks for one token
under each `--step-tokens` budget, once with chunks charged their attention to the entries before
them (`step_plan.chunk_cost`) and once by their tokens alone, alternating `--repeats` times. Prints
per budget and planner: the decode step's median, the prompt's steps (median, worst; worst over
the decode median), its TTFT and that over its TTFT alone (the faster of two prompts alone).

    python benchmarks/long_prompt_steps.py BUNDLE --step-tokens 48,64,80 --repeats 2 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from autocontrast.bench.cli import DEFAULT_TEXT
from autocontrast.runtime import Generator
from autocontrast.runtime.cli import bundle_mode
from autocontrast.serve.app import reserve_kv_memory
from autocontrast.serve.scheduler import DEFAULT_KV_RESERVE_BYTES


def alone_ttft(generator: Generator, mode, prompt: str, budget: int) -> float:
    stepper = generator.stepper(mode, max_step_tokens=budget)
    start = time.perf_counter()
    stepper.add(prompt, max_new_tokens=1, ignore_eos=True)
    while not stepper.done:
        stepper.step()
    return time.perf_counter() - start


def joined(generator: Generator, mode, lines: list[str], prompt: str, budget: int, *, weigh: bool,
           decode_steps: int = 20) -> tuple[list[float], list[float], float]:
    """Decode steps' ms before the prompt, the prompt's steps' ms, its TTFT in s."""
    stepper = generator.stepper(mode, max_step_tokens=budget)
    if not weigh:
        stepper.past_per_token = None
    for line in lines:
        stepper.add(line, max_new_tokens=300, ignore_eos=True)
    decode = []
    for _ in range(5 + decode_steps):
        start = time.perf_counter()
        stepper.step()
        decode.append(1e3 * (time.perf_counter() - start))
    row = stepper.add(prompt, max_new_tokens=1, ignore_eos=True)
    start, steps = time.perf_counter(), []
    while row in stepper.prefilling:
        begun = time.perf_counter()
        stepper.step()
        steps.append(1e3 * (time.perf_counter() - begun))
    return decode[5:], steps, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--step-tokens", default="48,64,80")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--long-words", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    generator = Generator(args.bundle, threads=args.threads)
    reserve_kv_memory(generator, DEFAULT_KV_RESERVE_BYTES, max_batch=8)  # as acd-serve does at start-up
    mode = bundle_mode(generator.manifest, "contrast", None, None, None, None)
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    words = text.split()
    lines = [line.strip()[:300] for line in text.splitlines() if len(line.strip()) > 200][:args.rows]
    prompts = [" ".join(words[i * args.long_words:(i + 1) * args.long_words]) for i in range(3)]
    print(f"{args.rows} rows decoding; a prompt of {len(generator.encode(prompts[2]))} tokens joins "
          f"(mixed-step graph: {'yes' if generator.mixed_session(generator.mode(mode).graph) else 'no'})")
    print("| budget | chunks charged | decode step ms | prompt's steps | its steps ms median / worst | worst / decode "
          "| TTFT s | TTFT / alone |")
    print("|---|---|---|---|---|---|---|---|")
    for budget in (int(b) for b in args.step_tokens.split(",")):
        alone = min(alone_ttft(generator, mode, p, budget) for p in prompts[:2])
        for _ in range(args.repeats):
            for weigh in (True, False):
                decode, steps, ttft = joined(generator, mode, lines, prompts[2], budget, weigh=weigh)
                d = statistics.median(decode)
                print(f"| {budget} | {'attention too' if weigh else 'tokens only'} | {d:.1f} | {len(steps)} | "
                      f"{statistics.median(steps):.1f} / {max(steps):.1f} | {max(steps) / d:.2f}x | {ttft:.2f} | "
                      f"{ttft / alone:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
