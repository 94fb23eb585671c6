"""A batch's decode step and a joining prompt's chunk: two calls (the decode graph, then the chunk on it) against
one call of the bundle's mixed-step graph (`acd-export --mixed-step`).

`--rows` rows decode at `--past` positions while a one-row chunk of each `--chunks` size joins at
`--chunk-past`; each setting alternates the two ways `--repeats` times (after `--warmup`) and prints
the median of each and their ratio.

    python benchmarks/mixed_step_cost.py BUNDLE --rows 4 --past 300 --chunks 16,32,48,64 --chunk-past 850
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from autocontrast.bundle import DECODE_EXITS
from autocontrast.runtime import Generator
from autocontrast.runtime.inplace_state import InPlaceDecodeState
from autocontrast.runtime.mixed_step import mixed_step


def filled(session, rows: int, past: int) -> InPlaceDecodeState:
    """A state of `rows` rows holding `past` entries each (values of a real prefill of token 1s)."""
    state = InPlaceDecodeState(session)
    state.extend([[1] * past for _ in range(rows)], columns=past + 1024)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--past", type=int, default=300)
    parser.add_argument("--chunks", default="16,32,48,64")
    parser.add_argument("--chunk-past", type=int, default=850)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    generator = Generator(args.bundle, threads=args.threads, preload=())
    graph = generator.manifest.graph(DECODE_EXITS)
    mixed = generator.mixed_session(graph)
    if mixed is None:
        raise SystemExit(f"{args.bundle} has no mixed-step graph: export it with acd-export --mixed-step")
    session = generator.session(graph)
    fused = frozenset(o for o in (graph.contrast.output if graph.contrast else None,) if o)
    print(f"{args.rows} rows decoding at {args.past} positions, one prompt chunk at {args.chunk_past}; graph {graph.name}")
    print("| chunk tokens | two calls ms | mixed call ms | mixed / two |")
    print("|---|---|---|---|")
    for size in (int(c) for c in args.chunks.split(",")):
        times: dict[str, list[float]] = {"two": [], "mixed": []}
        for i in range(args.warmup + args.repeats):
            for way in ("two", "mixed"):
                batch, prompt = filled(session, args.rows, args.past), filled(session, 1, args.chunk_past)
                tokens, chunk = np.ones(args.rows, np.int64), np.ones((1, size), np.int64)
                start = time.perf_counter()
                if way == "two":
                    batch.advance(tokens)
                    prompt.feed(chunk)
                else:
                    mixed_step(mixed, batch, tokens, prompt, chunk, fused=fused)
                if i >= args.warmup:
                    times[way].append(1e3 * (time.perf_counter() - start))
        two, one = statistics.median(times["two"]), statistics.median(times["mixed"])
        print(f"| {size} | {two:.1f} | {one:.1f} | {one / two:.2f} |")


if __name__ == "__main__":
    main()
