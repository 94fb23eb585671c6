"""Continuous batching: one thread steps a shared batch that requests join and leave between steps.

The scheduler owns one `Stepper` per decode graph (requests whose modes share a graph share a
batch; a fused-contrast request and a NumPy-contrast request both run on the exits graph). Every
loop it drops rows whose client left, admits queued jobs up to `max_batch` running rows, and steps
each stepper with work once, handing each job its `TokenEvent`. ONNX Runtime releases the GIL
while it computes, so the HTTP event loop stays responsive.

The queue is bounded (`QueueFullError` when full: the server answers 429); no accepted job is ever
dropped: `stop()` lets queued and running jobs finish (the drain on SIGTERM) unless told not to.

>>> scheduler = Scheduler(generator, max_batch=8, max_queue=64)  # doctest: +SKIP
>>> scheduler.start(); scheduler.submit(job)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from autocontrast.config import MultiExitConfiguration
from autocontrast.errors import AutocontrastError
from autocontrast.runtime.generator import Generator
from autocontrast.runtime.params import GenerationParams
from autocontrast.runtime.stepper import Stepper, TokenEvent

log = logging.getLogger("autocontrast.serve")


class QueueFullError(AutocontrastError):
    """The scheduler's queue is full: try again later."""


class SchedulerStoppedError(AutocontrastError):
    """The scheduler no longer takes jobs (the server is shutting down)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request's generation. `on_event(event)` is called from the scheduler thread with each
    `TokenEvent`, or with an exception if the job failed; the last event has a finish_reason."""

    prompt_ids: list[int]
    params: GenerationParams
    multi_exit: MultiExitConfiguration
    on_event: Callable[[TokenEvent | BaseException], None]
    graph: str = ""  # the decode graph its mode runs on (set by `submit`)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    last_token: float | None = None
    generated: int = 0
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    channel: Any = None  # the submitter's own end (the HTTP app keeps its asyncio queue here)

    def cancel(self) -> None:
        """The client left: the row is dropped before the next step."""
        self.cancelled.set()


class Scheduler:
    """Steps every running job; `submit` from any thread. `observe(kind, value)` receives metrics."""

    def __init__(self, generator: Generator, *, max_batch: int = 8, max_queue: int = 64,
                 observe: Callable[[str, float], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch ({max_batch}) must be >= 1 and max_queue ({max_queue}) >= 0")
        self.generator, self.max_batch, self.max_queue = generator, max_batch, max_queue
        self._observe = observe or (lambda kind, value: None)
        self._queue: collections.deque[Job] = collections.deque()
        self._steppers: dict[str, Stepper] = {}
        self._rows: dict[str, dict[int, Job]] = {}  # graph -> row id -> job
        self._running = 0  # rows in the steppers' batches (kept by the scheduler thread)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- from request threads -------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    @property
    def alive(self) -> bool:
        """Whether the scheduler thread is running (a health check asks this)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue a job (its mode resolved now, so a bad one fails here); `QueueFullError` when full."""
        job.graph = self.generator.mode(job.multi_exit).graph.name
        with self._wake:
            if self._stopping:
                raise SchedulerStoppedError("the server is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue and self.running >= self.max_batch:
                raise QueueFullError(f"the queue is full ({self.max_queue} waiting, {self.running} running)")
            self._queue.append(job)
            self._observe("queue_depth", len(self._queue))
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="acd-scheduler", daemon=True)
        self._thread.start()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new jobs; with `drain`, finish every queued and running job first."""
        with self._wake:
            self._stopping = True
            if not drain:
                for job in list(self._queue):
                    job.on_event(SchedulerStoppedError("the server stopped before this request ran"))
                self._queue.clear()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the scheduler thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._drop_cancelled()
                self._admit()
                busy = [g for g, rows in self._rows.items() if rows]
                if not busy:
                    if self._stopping and not self._queue:
                        return
                    self._wake.wait(timeout=0.5)
                    continue
            self._observe("batch_size", sum(len(self._rows[g]) for g in busy))
            for graph in busy:
                self._step(graph)

    def _drop_cancelled(self) -> None:
        for graph, rows in self._rows.items():
            gone = [row for row, job in rows.items() if job.cancelled.is_set()]
            if gone:
                self._steppers[graph].drop_rows(gone)
                for row in gone:
                    del rows[row]
                self._running -= len(gone)
                self._observe("cancelled", len(gone))
        kept = [j for j in self._queue if not j.cancelled.is_set()]
        if len(kept) != len(self._queue):
            self._queue = collections.deque(kept)

    def _admit(self) -> None:
        while self._queue and self.running < self.max_batch:
            job = self._queue.popleft()
            stepper = self._steppers.get(job.graph)
            if stepper is None:
                stepper = self._steppers[job.graph] = self.generator.stepper(job.multi_exit)
            try:
                row = stepper.add(job.prompt_ids, job.params, multi_exit=job.multi_exit)
            except AutocontrastError as err:  # checked at submit; a stepper-specific refusal lands here
                job.on_event(err)
                continue
            self._rows.setdefault(job.graph, {})[row] = job
            self._running += 1
        self._observe("queue_depth", len(self._queue))

    def _step(self, graph: str) -> None:
        stepper, rows = self._steppers[graph], self._rows[graph]
        try:
            events = stepper.step()
        except Exception as err:  # noqa: BLE001 - one failed step fails its batch, not the server
            log.exception("step of graph %s failed; failing its %d request(s)", graph, len(rows))
            for job in rows.values():
                job.on_event(err)
            self._running -= len(rows)
            rows.clear()
            del self._steppers[graph]
            return
        now = time.perf_counter()
        for event in events:
            job = rows.get(event.row)
            if job is None:
                continue
            self._observe("ttft" if job.last_token is None else "inter_token",
                          now - (job.submitted if job.last_token is None else job.last_token))
            job.last_token, job.generated = now, job.generated + 1
            job.on_event(event)
        finished = [e.row for e in events if e.finish_reason is not None and e.row in rows]
        if finished:  # release their cache now, in one reshaping; nothing of them is read again
            stepper.drop_rows(finished)
            for row in finished:
                del rows[row]
            self._running -= len(finished)

    def describe(self) -> dict[str, Any]:
        return {"queue_depth": self.queue_depth, "running": self.running, "max_batch": self.max_batch,
                "max_queue": self.max_queue}
