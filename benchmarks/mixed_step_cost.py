"""A batch's decode step and a joining prompt's chunk: two calls (the decode graph, then the chunk on it) against
one call of the bundle's mixed-step graph (`acd-export --mixed-step`).

`--rows` rows decode at `--past` positions while a one-row chunk of each `--chunks` size joins at
`--chunk-past`; each setting alternates the two ways `--repeats` times (after `--warmup`) and prints
the median of each and their ratio.

    python benchmarks/mixed_step_cost.py BUNDLE --rows 4 --past 300 --chunks 16,32,48,64 --chunk-past 850

`--profile` instead runs the mixed call under ONNX Runtime's profiler and prints, per chunk size, each
op type's time per call, GroupQueryAttention split into the decode rows' and the chunk's nodes (what
`step_plan.PAST_PER_TOKEN_PER_HIDDEN` rests on: compare `--chunk-past 100` with `--chunk-past 1900`):

    python benchmarks/mixed_step_cost.py BUNDLE --chunks 64 --chunk-past 1900 --threads 2 --repeats 6 --profile
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from autocontrast.bundle import DECODE_EXITS, MIXED
from autocontrast.runtime import Generator
from autocontrast.runtime.inplace_state import InPlaceDecodeState
from autocontrast.runtime.mixed_step import mixed_step
from autocontrast.runtime.session import open_session


def filled(session, rows: int, past: int) -> InPlaceDecodeState:
    """A state of `rows` rows holding `past` entries each (values of a real prefill of token 1s)."""
    state = InPlaceDecodeState(session)
    state.extend([[1] * past for _ in range(rows)], columns=past + 1024)
    return state


def profile(generator: Generator, graph, session, args: argparse.Namespace, fused: frozenset[str]) -> None:
    """Each op type's ms per mixed call, from ONNX Runtime's profile of `--repeats` calls per chunk size."""
    spec = next(g for g in generator.manifest.graphs if g.kind == MIXED and g.mixes == graph.name)
    print("| chunk tokens | op | ms per call |")
    print("|---|---|---|")
    for size in (int(c) for c in args.chunks.split(",")):
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "mixed")
        if args.threads:
            options.intra_op_num_threads = args.threads
        mixed = open_session(Path(args.bundle), generator.manifest, spec, session=ort.InferenceSession(
            str(Path(args.bundle) / spec.file), sess_options=options, providers=["CPUExecutionProvider"]))
        for _ in range(args.repeats):
            batch, prompt = filled(session, args.rows, args.past), filled(session, 1, args.chunk_past)
            mixed_step(mixed, batch, np.ones(args.rows, np.int64), prompt, np.ones((1, size), np.int64), fused=fused)
        events = json.loads(Path(mixed.session.end_profiling()).read_text())
        per_op: collections.Counter[str] = collections.Counter()
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                op = event["args"]["op_name"]
                if op == "GroupQueryAttention":  # the chunk's nodes are the second of each layer's pair ("..._1")
                    op += " (chunk)" if event["name"].removesuffix("_kernel_time").endswith("_1") else " (decode rows)"
                per_op[op] += event["dur"]
        for op, microseconds in per_op.most_common(6):
            print(f"| {size} | {op} | {microseconds / 1e3 / args.repeats:.2f} |")


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
    parser.add_argument("--profile", action="store_true", help="each op type's time per mixed call, not the timing")
    args = parser.parse_args()
    generator = Generator(args.bundle, threads=args.threads, preload=())
    graph = generator.manifest.graph(DECODE_EXITS)
    mixed = generator.mixed_session(graph)
    if mixed is None:
        raise SystemExit(f"{args.bundle} has no mixed-step graph: export it with acd-export --mixed-step")
    session = generator.session(graph)
    fused = frozenset(o for o in (graph.contrast.output if graph.contrast else None,) if o)
    if args.profile:
        print(f"{args.rows} rows decoding at {args.past} positions, one prompt chunk at {args.chunk_past}; "
              f"{args.repeats} profiled mixed calls per chunk size")
        profile(generator, graph, session, args, fused)
        return
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
