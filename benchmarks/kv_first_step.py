"""The first step on a new KV buffer: memory fresh from the system against a block from the KV pool.

GroupQueryAttention touches a buffer's whole capacity on its first run, so the first step on a new
buffer pays a page fault per 4 KiB of it where the memory is new to the process (on a VM whose host
backs guest memory lazily, ~12 us each). `autocontrast.runtime.kv_pool` lends blocks the process
touched before. This prints, per repeat, the first and second step of a one-row chunk on a buffer of
`--capacity` columns: from the pool (the block of the repeat before, given back), then with every
block fresh and held to the end (`KVPool(0)`, the buffers kept: as a server's memory is while a
prefix cache or other rows hold it, so the system has no page just freed to hand back).

    python benchmarks/kv_first_step.py BUNDLE --capacity 2048 --chunk 48 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import numpy as np

from autocontrast.runtime import Generator, kv_buffer
from autocontrast.runtime.kv_buffer import KVBuffer
from autocontrast.runtime.kv_pool import KVPool


def first_steps(session, capacity: int, chunk: int, repeats: int, pool: KVPool, *,
                hold: bool) -> list[tuple[float, float]]:
    """(first, second) step in ms on a new one-row buffer per repeat, its blocks from `pool` (`hold`: every
    buffer kept until all repeats ran)."""
    kv_buffer.default_pool = lambda: pool
    ids = np.ones((1, chunk), np.int64)
    mask = np.ones((1, chunk), np.int64)
    positions = np.arange(chunk)[None]
    out, held = [], []
    for _ in range(repeats):
        buffer = KVBuffer(session.kv, 1, capacity, device=session.device, live_layers=session.graph.layers)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            session.step(ids, mask, positions, buffer)
            times.append(1e3 * (time.perf_counter() - start))
        out.append((times[0], times[1]))
        if hold:
            held.append(buffer)
        del buffer
        gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--capacity", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    generator = Generator(args.bundle, threads=args.threads, preload=())
    session = generator.decode_state(generator.mode().graph).session
    megabytes = KVBuffer(session.kv, 1, args.capacity).views()[0].nbytes * 2 * session.kv.num_layers / 1e6
    print(f"one row, {args.capacity} columns: {megabytes:.0f} MB of KV buffer; chunk of {args.chunk} tokens")
    print("| blocks | first step ms (median) | second step ms (median) | first steps ms |")
    print("|---|---|---|---|")
    for label, pool, hold in (("from the pool", KVPool(4 << 30), False), ("fresh, held", KVPool(0), True)):
        runs = first_steps(session, args.capacity, args.chunk, args.repeats, pool, hold=hold)
        print(f"| {label} | {statistics.median(r[0] for r in runs):.0f} | {statistics.median(r[1] for r in runs):.0f} "
              f"| {', '.join(f'{r[0]:.0f}' for r in runs)} |")


if __name__ == "__main__":
    main()
