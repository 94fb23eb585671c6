"""Continuous batching: one thread steps a shared batch that requests join and leave between steps.

The scheduler owns one `Stepper` per decode graph (requests whose modes share a graph share a
batch; a fused-contrast request and a NumPy-contrast request both run on the exits graph). Every
loop it drops rows whose client left, admits queued requests up to `max_batch` rows
(`Stepper.submit`), and runs one planned step of each stepper with work, which hands each request its
`TokenEvent`. Requests come checked (`Model.request`, at the HTTP edge): only their status is looked
at here. A step's plan (`autocontrast.runtime.step_plan`) gives every decoding row its token first and joining prompts
what is left of `max_step_tokens`, so a long prompt joins over several steps instead of freezing
every stream; prompts start from the longest prefix a `PrefixCache` holds (one per graph, within
`prefix_cache_bytes`). ONNX Runtime releases the GIL while it computes, so the HTTP event loop
stays responsive.

The queue is bounded (`QueueFullError` when full: the server answers 429); no accepted request is
ever dropped: `stop()` lets queued and running requests finish (the drain on SIGTERM) unless told not to.

>>> scheduler = Scheduler(generator, max_batch=8, max_queue=64)  # doctest: +SKIP
>>> scheduler.start(); scheduler.submit(request)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from autocontrast.errors import AutocontrastError
from autocontrast.runtime.generator import Generator
from autocontrast.runtime.prefix_cache import PrefixCache
from autocontrast.runtime.request import Request, RequestStatus
from autocontrast.runtime.step_plan import step_budget_problem
from autocontrast.runtime.stepper import Stepper

log = logging.getLogger("autocontrast.serve")

DEFAULT_MAX_STEP_TOKENS = 32  # tokens one step feeds the model (decode rows + prompt chunks); README measures it
DEFAULT_PREFIX_CACHE_BYTES = 512 << 20  # stored prompt caches per decode graph
DEFAULT_KV_RESERVE_BYTES = 512 << 20  # KV memory touched at start-up (autocontrast.runtime.kv_pool); README measures it


class QueueFullError(AutocontrastError):
    """The scheduler's queue is full: try again later."""


class SchedulerStoppedError(AutocontrastError):
    """The scheduler no longer takes jobs (the server is shutting down)."""


class Scheduler:
    """Steps every running job; `submit` from any thread. `observe(kind, value)` receives metrics."""

    def __init__(self, generator: Generator, *, max_batch: int = 8, max_queue: int = 64,
                 max_step_tokens: int | None = DEFAULT_MAX_STEP_TOKENS,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
                 observe: Callable[[str, float], None] | None = None) -> None:
        if problem := step_budget_problem(max_step_tokens):
            raise ValueError(problem)
        if max_batch < 1 or max_queue < 0 or prefix_cache_bytes < 0:
            raise ValueError(f"max_batch ({max_batch}) must be >= 1, max_queue ({max_queue}) >= 0, "
                             f"prefix_cache_bytes ({prefix_cache_bytes}) >= 0")
        self.generator, self.max_batch, self.max_queue = generator, max_batch, max_queue
        self.max_step_tokens, self.prefix_cache_bytes = max_step_tokens, prefix_cache_bytes
        self._observe = observe or (lambda kind, value: None)
        self._queue: collections.deque[Request] = collections.deque()
        self._steppers: dict[str, Stepper] = {}
        self._rows: dict[str, dict[int, Request]] = {}  # graph -> row id -> request in that stepper
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- from request threads -------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests in a batch (prefilling or decoding)."""
        return sum(len(rows) for rows in list(self._rows.values()))

    def prefix_stats(self) -> dict[str, int]:
        """Prompt tokens reused from stored prefixes, and lookups that hit or missed, over every graph."""
        caches = [s.prefix_cache for s in list(self._steppers.values()) if s.prefix_cache is not None]
        return {"hits": sum(c.stats.hits for c in caches), "misses": sum(c.stats.misses for c in caches),
                "tokens_reused": sum(c.stats.tokens_reused for c in caches),
                "bytes": sum(c.bytes for c in caches)}

    @property
    def alive(self) -> bool:
        """Whether the scheduler thread is running (a health check asks this)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: Request) -> None:
        """Queue a request made by `generator.request` (QUEUED); `QueueFullError` when full."""
        self.submit_all([request])

    def submit_all(self, requests: list[Request]) -> None:
        """Queue several requests (one HTTP request's choices) together: all of them, or none
        (`QueueFullError` when they do not all fit)."""
        for request in requests:  # refused here, in the caller's thread, not when the scheduler takes it in
            request.check_queued()
        with self._wake:
            if self._stopping:
                raise SchedulerStoppedError("the server is shutting down and takes no new requests")
            free = self.max_queue - len(self._queue) + max(0, self.max_batch - self.running)
            if len(requests) > free:
                raise QueueFullError(f"the queue is full ({len(self._queue)} of {self.max_queue} waiting, "
                                     f"{self.running} running; {len(requests)} asked for)")
            self._queue.extend(requests)
            self._observe("queue_depth", len(self._queue))
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="acd-scheduler", daemon=True)
        self._thread.start()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with `drain`, finish every queued and running request first."""
        with self._wake:
            self._stopping = True
            if not drain:
                for request in list(self._queue):
                    request.fail(SchedulerStoppedError("the server stopped before this request ran"))
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
            gone = [row for row, request in rows.items() if request.cancel_requested]
            if gone:
                self._steppers[graph].drop_rows(gone)  # CANCELLED there
                for row in gone:
                    del rows[row]
                self._observe("cancelled", len(gone))
        kept = [r for r in self._queue if not r.cancel_requested]
        if len(kept) != len(self._queue):
            for request in self._queue:
                if request.cancel_requested:
                    request.move(RequestStatus.CANCELLED)
            self._queue = collections.deque(kept)

    def _admit(self) -> None:
        while self._queue and self.running < self.max_batch:
            request = self._queue.popleft()
            graph = request.mode.graph.name
            stepper = self._steppers.get(graph)
            if stepper is None:
                stepper = self._steppers[graph] = Stepper(
                    self.generator, request.mode, max_step_tokens=self.max_step_tokens,
                    prefix_cache=PrefixCache(self.prefix_cache_bytes) if self.prefix_cache_bytes else None)
            row = stepper.submit(request)  # PREFILLING
            self._rows.setdefault(graph, {})[row] = request
        self._observe("queue_depth", len(self._queue))

    def _step(self, graph: str) -> None:
        stepper, rows = self._steppers[graph], self._rows[graph]
        begun = time.perf_counter()
        try:
            events = stepper.step()
        except Exception:  # noqa: BLE001 - one failed step fails its batch (the stepper did), not the server
            log.exception("step of graph %s failed; its %d request(s) failed", graph, len(rows))
            rows.clear()
            del self._steppers[graph]
            return
        if log.isEnabledFor(logging.DEBUG) and stepper.last_plan is not None:  # acd-serve --log-level debug
            plan = stepper.last_plan
            log.debug("step %s: %d decoding, %d prompt tokens in %d chunk(s)%s, %.1f ms", graph, len(plan.decode),
                      plan.tokens - len(plan.decode), len(plan.chunks),
                      "".join(f" [row {c.row}: {c.start}-{c.stop}]" for c in plan.chunks),
                      1e3 * (time.perf_counter() - begun))
        for event in events:  # delivered by the stepper: status, timing, sink
            request = rows.get(event.row)
            if request is not None and request.since_last is not None:
                self._observe("ttft" if request.generated == 1 else "inter_token", request.since_last)
        finished = [e.row for e in events if e.finish_reason is not None and e.row in rows]
        if finished:  # release their cache now, in one reshaping; nothing of them is read again
            stepper.drop_rows(finished)
            for row in finished:
                del rows[row]

    def describe(self) -> dict[str, Any]:
        return {"queue_depth": self.queue_depth, "running": self.running, "max_batch": self.max_batch,
                "max_queue": self.max_queue, "max_step_tokens": self.max_step_tokens,
                "prefix_cache": self.prefix_stats()}
