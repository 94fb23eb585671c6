"""One worker process per benchmarked system: it loads the system once, then runs what it is sent.

A process per system keeps each system's peak memory its own and lets torch-free systems run where
torch is absent. The driver talks to workers over a pipe; nothing here knows what a system is: the
driver hands each worker a spec and the (module-level, picklable) function that builds it.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import resource
import sys
import traceback
from collections.abc import Callable
from typing import Any

from autocontrast.bench.stats import RunTiming
from autocontrast.errors import AutocontrastError


def _rss_peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _serve(conn: Any, spec: Any, build: Callable[[Any], Any]) -> None:
    try:
        system = build(spec)
        reason = system.skip_reason()
        if reason is None:
            system.load()
    except Exception as err:  # a system that cannot load is reported as skipped, with why
        reason = f"failed to load: {type(err).__name__}: {err}"
    if reason is not None:
        conn.send(("skip", reason))
        return
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message[0] == "stop":
            getattr(system, "close", lambda: None)()  # free native resources before interpreter shutdown
            return
        _, prompts, new_tokens = message
        try:
            timing = system.generate(prompts, new_tokens)
            device = getattr(system, "device_peak_mib", lambda: None)()
            conn.send(("ok", dataclasses.replace(timing, rss_peak_mib=_rss_peak_mib(), device_peak_mib=device)))
        except AutocontrastError as err:  # a run the system cannot do (a batch it does not take): say so, no trace
            conn.send(("error", str(err)))
        except Exception as err:
            traceback.print_exc()
            conn.send(("error", f"{type(err).__name__}: {err}"))


class Worker:
    """Driver-side handle of a worker process."""

    def __init__(self, spec: Any, build: Callable[[Any], Any]) -> None:
        self.spec = spec
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, spec, build), daemon=True)
        self._process.start()
        self.skipped: str | None = None

    def wait_ready(self, timeout: float) -> None:
        if not self._conn.poll(timeout):
            self.skipped = f"did not load within {timeout:.0f} s"
            self.close()
            return
        try:
            status, detail = self._conn.recv()
        except EOFError:  # the process died without a word: killed (the OOM killer) or crashed in native code
            self.skipped = f"its worker died while loading ({self._died()})"
            self.close()
            return
        if status == "skip":
            self.skipped = detail
            self.close()

    def run(self, prompts: list[list[int]], new_tokens: int, *, timeout: float) -> RunTiming | str:
        """A timing, or a string saying why the run failed."""
        try:
            self._conn.send(("run", prompts, new_tokens))
        except OSError:  # BrokenPipeError: it died after loading (another system's load woke the OOM killer)
            return f"its worker died before the run ({self._died()})"
        if not self._conn.poll(timeout):
            self.close()
            return f"run did not finish within {timeout:.0f} s"
        try:
            status, detail = self._conn.recv()
        except EOFError:
            return f"its worker died during the run ({self._died()})"
        return detail if status == "ok" else str(detail)

    def _died(self) -> str:
        """Why the worker process ended, in words (its exit status; a kill names the likely killer)."""
        self._process.join(timeout=10)
        code = self._process.exitcode
        if code == -9:
            return ("killed by SIGKILL, most likely the kernel's OOM killer: each system holds its own "
                    "weights, so benchmark fewer systems at once or add --share-weights")
        return f"exit status {code}"

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
