"""What one decode-graph call costs by its shape: rows x new tokens at a given past length.

The long-prompt scenario's arithmetic (README, "The scheduler") rests on these: a decode step of the
running rows, a prompt chunk beside it, and the alone prompt's large chunks. Each shape runs on a
fresh one-block KV buffer, `--repeats` times after `--warmup`, and prints the median call and the
cost per new token.

    python benchmarks/step_cost.py BUNDLE --shapes 1x1@300,4x1@300,1x48@850,1x512@850 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from autocontrast.runtime import Generator
from autocontrast.runtime.kv_buffer import KVBuffer, capacity_for


def parse_shape(text: str) -> tuple[int, int, int]:
    """'ROWSxTOKENS@PAST' -> (rows, tokens, past)."""
    size, past = text.split("@")
    rows, tokens = size.split("x")
    return int(rows), int(tokens), int(past)


def call_ms(session, rows: int, tokens: int, past: int, *, repeats: int, warmup: int) -> float:
    buffer = KVBuffer(session.kv, rows, capacity_for(past + tokens + 1), live_layers=session.graph.layers)
    ids = np.ones((rows, tokens), np.int64)
    mask = np.ones((rows, past + tokens), np.int64)
    positions = np.broadcast_to(past + np.arange(tokens), (rows, tokens)).copy()
    times = []
    for _ in range(warmup + repeats):
        start = time.perf_counter()
        session.step(ids, mask, positions, buffer)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--graph", help="decode graph (default: the first with a fused contrast, else the original)")
    parser.add_argument("--shapes", default="1x1@300,4x1@300,1x48@850,1x512@850")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    generator = Generator(args.bundle, threads=args.threads, preload=())
    graphs = [g for g in generator.manifest.graphs if g.kind == "decode"]
    graph = (generator.manifest.graph(args.graph) if args.graph else
             next((g for g in graphs if g.contrast is not None), generator.mode().graph))
    session = generator.decode_state(graph).session
    print(f"graph {graph.name} (exits {', '.join(map(str, graph.exits))})")
    print("| rows x new tokens @ past | call ms (median) | ms per new token |")
    print("|---|---|---|")
    for text in args.shapes.split(","):
        rows, tokens, past = parse_shape(text)
        ms = call_ms(session, rows, tokens, past, repeats=args.repeats, warmup=args.warmup)
        print(f"| {rows} x {tokens} @ {past} | {ms:.1f} | {ms / (rows * tokens):.2f} |")


if __name__ == "__main__":
    main()
