"""Memory of an export: what each stage peaked at, and an early refusal when the machine cannot hold it.

`StageMeter` wraps an export's log: every stage line (`[k/6] ...`) closes the previous stage with its
time and its peak resident memory (sampled every `SAMPLE_S` by a thread; the kernel's own high-water
mark is left alone, so `/usr/bin/time -v` still reports the whole run's), so a user exporting a 3B
model sees where the memory goes, and the summary says the highest. `check_memory` compares an estimate made from the config, before anything loads,
with what the machine has available, and refuses with the figures instead of meeting the OOM killer.

>>> meter = StageMeter(print)
>>> meter("[1/6] loading model")  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autocontrast.errors import ExportError

STAGE = re.compile(r"^\[(\d+)/(\d+)\] ")
GB = 1e9
SAMPLE_S = 0.02  # a stage's peak is the highest of these samples (a spike shorter than this may be missed)


def resident_bytes() -> int | None:
    """VmRSS of /proc/self/status in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo: what can be allocated without swapping (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of an export: its first log line, duration, resident memory at its start and its peak."""

    line: str
    seconds: float
    start_bytes: int | None
    peak_bytes: int | None


class StageMeter:
    """A log function that times each `[k/n]` stage and records its peak resident memory."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.stages: list[Stage] = []
        self._current: str | None = None
        self._started = time.perf_counter()
        self._peak = self._start = resident_bytes()
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="export-memory", daemon=True)
        if self._peak is not None:
            self._sampler.start()

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_S):
            now = resident_bytes() or 0
            if now > (self._peak or 0):
                self._peak = now

    def __call__(self, message: str) -> None:
        if STAGE.match(message) and message.split("] ")[0] != (self._current or "").split("] ")[0]:
            self.close()
            self._current = message
        self.log(message)

    def close(self) -> None:
        """End the running stage (its figures land in `stages` and on the log)."""
        if self._current is None:
            return
        now = resident_bytes()
        peak = None if now is None else max(now, self._peak or 0)
        seconds = time.perf_counter() - self._started
        self.stages.append(Stage(self._current, seconds, self._start, peak))
        if peak is not None:
            self.log(f"      ({seconds:.1f} s, peak resident {peak / GB:.2f} GB)")
        self._current, self._started, self._peak, self._start = None, time.perf_counter(), now, now

    def stop(self) -> None:
        """Close the running stage and stop sampling."""
        self.close()
        self._done.set()
        if self._sampler.is_alive():
            self._sampler.join()


# An export's peak (`/usr/bin/time -v`, README "Export at real model shapes"; benchmarks/export_shapes.py):
# the process's own libraries, the model (memory-mapped float32 weights, touched by the trace), one folded
# copy of the embedding (the tied head, transposed for the trace), and the working set of the largest
# pass (validation's float64 layer and head, the sessions), which grows with the model up to a few GB.
# Fitted to the five runs of 2026-12-07 (SmolLM2-135M to the SmolLM2-1.7B shape): it bounds each from
# above, by 1.2x at most. The Llama-3.2-3B shape (17.6 GB estimated) exported on a 24 GB machine: its
# resident peak, 24.6 GB, was mostly mapped weight pages the kernel reclaimed as it needed (anonymous
# memory peaked at 4.6 GB), so the estimate is conservative there.
BASE_BYTES = 1_000_000_000
WORKING_SET_FACTOR = 0.35
WORKING_SET_CAP = 2_200_000_000
# Validation's float64 reference widens decoder layers whose float64 copy is at most this many bytes once,
# for the whole check (a 135M model's: 0.85 GB; 6 s quicker than widening each layer each time it runs);
# the process then holds the model's float32 pages and its float64 copy at once.
REFERENCE_WHOLE_LAYERS_BYTES = 1 << 30


def estimate_export_bytes(float32_weight_bytes: int, embedding_bytes: int) -> int:
    """The estimated peak resident memory of exporting a model with these float32 weight and embedding bytes."""
    working_set = embedding_bytes + min(WORKING_SET_FACTOR * float32_weight_bytes, WORKING_SET_CAP)
    # the layers' float64 copy is widened whole where the smallest they can be (an untied head as large as the
    # embedding) fits the bound: then the reference holds a float64 copy of every weight
    if 2 * (float32_weight_bytes - 2 * embedding_bytes) <= REFERENCE_WHOLE_LAYERS_BYTES:
        working_set = max(working_set, 2 * float32_weight_bytes)
    return int(BASE_BYTES + float32_weight_bytes + working_set)


def embedding_float32_bytes(config: Any, hidden_size: int) -> int:
    """The float32 bytes of the token embedding (vocabulary x hidden), the matrix a tied head folds a copy of."""
    return 4 * int(config.vocab_size) * hidden_size


def checkpoint_float32_bytes(model: str, config: Any) -> int | None:
    """The float32 size of a local checkpoint's weights, from its files and stored dtype (None for a hub id)."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    stored = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    dtype = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or "float32")
    itemsize = 2 if dtype.removeprefix("torch.") in ("float16", "bfloat16") else 4
    return stored * 4 // itemsize


def release_freed_memory() -> None:
    """Hand memory freed by a finished stage back to the system (glibc keeps freed heap pages otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def check_memory(estimate: int, *, what: str, available: int | None = None) -> None:
    """Refuse an export whose estimated peak exceeds the memory available now (no-op where unknown)."""
    available = available_bytes() if available is None else available
    if available is not None and estimate > available:
        raise ExportError(f"{what} needs about {estimate / GB:.1f} GB of memory at its peak; this machine has "
                          f"{available / GB:.1f} GB available. Free memory or use a larger machine; "
                          "--no-memory-check exports anyway (the weights are memory-mapped, and the kernel "
                          "can reclaim their pages, so the estimate errs high)")
