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

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from autocontrast.errors import ExportError

STAGE = re.compile(r"^\[(\d+)/(\d+)\] ")
GB = 1e9
SAMPLE_S = 0.02  # a stage's peak is the highest of these samples (a spike shorter than this may be missed)


def _status_bytes(field: str) -> int | None:
    """A `VmXXX` field of /proc/self/status in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resident_bytes() -> int | None:
    return _status_bytes("VmRSS")


def peak_resident_bytes() -> int | None:
    """The process's resident high-water mark since it started (`VmHWM`)."""
    return _status_bytes("VmHWM")


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo: what can be allocated without swapping (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class StageMeter:
    """A log function that times each `[k/n]` stage and records its peak resident memory."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.stages: list[tuple[str, float, int | None]] = []  # (stage line, seconds, peak bytes)
        self._current: str | None = None
        self._started = time.perf_counter()
        self._peak = resident_bytes()
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
        self.stages.append((self._current, seconds, peak))
        if peak is not None:
            self.log(f"      ({seconds:.1f} s, peak resident {peak / GB:.2f} GB)")
        self._current, self._started, self._peak = None, time.perf_counter(), now

    def stop(self) -> None:
        """Close the running stage and stop sampling."""
        self.close()
        self._done.set()

    @property
    def peak(self) -> int | None:
        """The highest stage peak so far."""
        peaks = [p for _, _, p in self.stages if p is not None]
        return max(peaks) if peaks else None


def check_memory(estimate: int, *, what: str, available: int | None = None) -> None:
    """Refuse an export whose estimated peak exceeds the memory available now (no-op where unknown)."""
    available = available_bytes() if available is None else available
    if available is not None and estimate > available:
        raise ExportError(f"{what} needs about {estimate / GB:.1f} GB of memory at its peak; this machine has "
                          f"{available / GB:.1f} GB available. Free memory, export with --quantize int4 or "
                          "--dtype float16 (half the weights in memory), or use a larger machine")
