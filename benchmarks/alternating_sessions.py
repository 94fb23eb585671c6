"""Decode steps alternating between two graphs of one Generator, against each graph alone.

A server (or a Generator) running greedy on one graph and ACD on another steps their two ONNX
Runtime sessions in turn. This measures what that costs: the median step of each graph stepped
alone, then of each when the two alternate step by step, batch `--batch`, a `--prompt-tokens` prompt.

    python benchmarks/alternating_sessions.py BUNDLE --steps 48
    python benchmarks/alternating_sessions.py BUNDLE --steps 48 --keep-spinning   # ORT's default

`--keep-spinning` opens the sessions as ONNX Runtime would by default, their threads spinning on after
each run (`autocontrast.runtime.session.STOP_SPINNING_AFTER_RUN` off). The two graphs: the model's own
head (greedy's) and the first decode graph with a fused contrast in another file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from interleaved_steps import median_step_ms, real_prompt

from autocontrast.runtime import Generator
from autocontrast.runtime import session as runtime_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep-spinning", action="store_true", help="threads spin on after each run (ORT's default)")
    args = parser.parse_args()
    runtime_session.STOP_SPINNING_AFTER_RUN = not args.keep_spinning
    generator = Generator(args.bundle, threads=args.threads, preload=())
    greedy = generator.mode().graph
    contrast = next((g for g in generator.manifest.graphs if g.kind == "decode" and g.contrast is not None
                     and g.file != greedy.file), None)
    if contrast is None:
        parser.error(f"{args.bundle} serves greedy and ACD from one graph file: nothing alternates")
    prompt = real_prompt(generator, args.prompt_tokens)
    spinning = "spinning on after each run" if args.keep_spinning else "spinning stopped after each run"
    print(f"{args.bundle.name}: {greedy.name} and {contrast.name}, batch {args.batch}, {args.steps} steps, {spinning}")
    for label, graphs in (("alone", [greedy]), ("alone", [contrast]), ("alternating", [greedy, contrast])):
        medians = median_step_ms([generator.decode_state(g) for g in graphs], prompt, batch=args.batch, steps=args.steps)
        for graph, median in zip(graphs, medians, strict=True):
            print(f"  {label:<12} {graph.name:<16} median {median:7.1f} ms/step")


if __name__ == "__main__":
    main()
