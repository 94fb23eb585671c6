"""`Request`: one client request's generation, from the HTTP edge through queue, batch and finish.

Made once where the request arrives (validated and encoded there), it carries its own status, which
the scheduler moves along and derives its counts from:

    QUEUED -> PREFILLING -> DECODING -> FINISHED
       \\-----------\\-----------\\-----> CANCELLED (the client left) or FAILED (a step failed)

Its tokens go to its `sink` (the HTTP app's is an asyncio queue fed from the scheduler thread).
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from typing import Protocol

from autocontrast.config import MultiExitConfiguration
from autocontrast.runtime.params import GenerationParams
from autocontrast.runtime.stepper import TokenEvent


class RequestStatus(enum.Enum):
    QUEUED = "queued"  # waiting for a batch slot
    PREFILLING = "prefilling"  # in a batch, its prompt going into the cache (maybe over several steps)
    DECODING = "decoding"  # has its first token
    FINISHED = "finished"  # its last token has a finish reason
    CANCELLED = "cancelled"  # the client left; its row was dropped
    FAILED = "failed"  # a step failed (the sink got the exception)

    @property
    def final(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.CANCELLED, RequestStatus.FAILED)


class Sink(Protocol):
    """Where a request's tokens go: called from the scheduler thread with each `TokenEvent` (the last one
    has a finish reason), or once with the exception that ended it."""

    def __call__(self, event: TokenEvent | BaseException) -> None: ...


@dataclasses.dataclass(eq=False)
class Request:
    """One generation. `prompt_ids` are checked against the model (length, vocabulary) before it is made."""

    prompt_ids: list[int]
    params: GenerationParams
    multi_exit: MultiExitConfiguration
    sink: Sink
    graph: str = ""  # the decode graph its mode runs on (set by the scheduler's `submit`)
    status: RequestStatus = RequestStatus.QUEUED
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    generated: int = 0
    _cancel: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """The client left: its row is dropped before the next step (a no-op once it has ended)."""
        self._cancel.set()

    def deliver(self, event: TokenEvent, now: float) -> None:
        """A token for this request (scheduler thread): timing, status, then the sink."""
        self.first_token = self.first_token if self.first_token is not None else now
        self.last_token, self.generated = now, self.generated + 1
        self.status = RequestStatus.FINISHED if event.finish_reason is not None else RequestStatus.DECODING
        self.sink(event)

    def fail(self, err: BaseException) -> None:
        self.status = RequestStatus.FAILED
        self.sink(err)
