"""`Request`: one generation, from where it is made through queue, batch and finish, whoever drives it.

Every entry point makes one with `Model.request` (the HTTP app, `Generator.generate` and `stream`,
`Stepper.add`), which checks and encodes it once there: prompt, parameters against the model, the
decoding mode resolved to its graph. From then on it is the one holder of those facts, and of its
status, which whoever drives it moves along (a `Stepper` from `submit` on, the server's scheduler
while it waits in the queue):

    QUEUED -> PREFILLING -> DECODING -> FINISHED
       \\-----------\\-----------\\-----> CANCELLED (dropped before its end) or FAILED (a step failed)

A rewind (`Stepper.rewind_to`) moves a DECODING or FINISHED request back to DECODING, or to PREFILLING
when its prompt must be computed anew. Its tokens go to its `sink`, if it has one (the HTTP app's is an
asyncio queue fed from the scheduler thread).

>>> request = model.request("The history of Paris", max_new_tokens=8)  # doctest: +SKIP
>>> row = stepper.submit(request)  # doctest: +SKIP
>>> request.status  # doctest: +SKIP
<RequestStatus.PREFILLING: 'prefilling'>
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from typing import Protocol

from autocontrast.errors import RequestStateError
from autocontrast.runtime.modes import DecodeMode
from autocontrast.runtime.params import GenerationParams


class RequestStatus(enum.Enum):
    QUEUED = "queued"  # made, waiting for a batch slot
    PREFILLING = "prefilling"  # in a stepper, its prompt going into the cache (maybe over several steps)
    DECODING = "decoding"  # has its first token
    FINISHED = "finished"  # its last token has a finish reason
    CANCELLED = "cancelled"  # dropped before its end (the client left, the stream was closed)
    FAILED = "failed"  # a step failed (the sink got the exception)

    @property
    def final(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.CANCELLED, RequestStatus.FAILED)


_S = RequestStatus
MOVES: dict[RequestStatus, frozenset[RequestStatus]] = {  # status -> the statuses it may move to
    _S.QUEUED: frozenset({_S.PREFILLING, _S.CANCELLED, _S.FAILED}),
    _S.PREFILLING: frozenset({_S.DECODING, _S.FINISHED, _S.CANCELLED, _S.FAILED}),
    _S.DECODING: frozenset({_S.FINISHED, _S.PREFILLING, _S.CANCELLED, _S.FAILED}),
    _S.FINISHED: frozenset({_S.DECODING, _S.PREFILLING}),  # a rewind brings it back
    _S.CANCELLED: frozenset(),
    _S.FAILED: frozenset(),
}


@dataclasses.dataclass(frozen=True)
class ExitLogprobs:
    """A token's log-probability under one exit alone, and that exit's most likely tokens (id, logprob)."""

    exit: str
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One row's new token after a step."""

    row: int
    token: int
    text: str  # the new text (whole characters, held back before a possible stop string; may be '')
    finish_reason: str | None  # 'eos', 'stop_string', 'constraint', 'length' or None (goes on)
    logprob: float | None = None  # with params.logprobs: the token's log-probability under the row's mode
    top_logprobs: tuple[tuple[int, float], ...] = ()  # ... and the params.logprobs most likely (id, logprob)
    exit_logprobs: tuple[ExitLogprobs, ...] = ()  # with params.exit_logprobs: the same under each exit the mode reads


class Sink(Protocol):
    """Where a request's tokens go: called from the driving thread with each `TokenEvent` (the last one has
    a finish reason), or once with the exception that ended it."""

    def __call__(self, event: TokenEvent | BaseException) -> None: ...


@dataclasses.dataclass(eq=False)
class Request:
    """One generation, checked before it is made (make it with `Model.request`): `prompt_ids` within the
    model's positions with `params.max_new_tokens`, `params` within its vocabulary, `mode` resolved to the
    graph that runs it. A rewind into the prompt shortens `prompt_ids`."""

    prompt_ids: list[int]
    params: GenerationParams
    mode: DecodeMode
    sink: Sink | None = None
    status: RequestStatus = dataclasses.field(default=RequestStatus.QUEUED, init=False)
    history: list[RequestStatus] = dataclasses.field(default_factory=lambda: [RequestStatus.QUEUED], init=False)
    submitted: float = dataclasses.field(default_factory=time.perf_counter, init=False)  # when it was made
    first_token: float | None = dataclasses.field(default=None, init=False)
    last_token: float | None = dataclasses.field(default=None, init=False)
    # the latest token's wait: from the token before, or from `submitted` for the first (time to first token)
    since_last: float | None = dataclasses.field(default=None, init=False)
    generated: int = dataclasses.field(default=0, init=False)  # tokens delivered (rewinds do not take back)
    _cancel: threading.Event = dataclasses.field(default_factory=threading.Event, init=False, repr=False)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask for it to stop (from any thread): whoever drives it drops it before its next step (a no-op
        once it has ended)."""
        self._cancel.set()

    def check_queued(self) -> None:
        """`RequestStateError` unless it is QUEUED: only a request not yet run may be queued or submitted."""
        if self.status is not RequestStatus.QUEUED:
            raise RequestStateError(f"only a queued request can be submitted; this one is {self.status.value} "
                                    "(submitted before, or ended): make a new request")

    def admit(self) -> None:
        """Taken into a stepper's batch: QUEUED -> PREFILLING (`RequestStateError` if it is not queued)."""
        self.check_queued()
        self.move(RequestStatus.PREFILLING)

    def move(self, status: RequestStatus) -> None:
        """Move to `status` (recorded in `history`); staying where it is is nothing. `RequestStateError`
        for a move its status does not allow (submitted twice, or after it ended)."""
        if status is self.status:
            return
        if status not in MOVES[self.status]:
            raise RequestStateError(f"a {self.status.value} request cannot become {status.value}"
                                    f"{' (it has ended)' if self.status.final else ''}; make a new request")
        self.status = status
        self.history.append(status)

    def deliver(self, event: TokenEvent, now: float) -> None:
        """A token for this request: timing, status, then the sink."""
        self.since_last = now - (self.submitted if self.last_token is None else self.last_token)
        self.first_token = self.first_token if self.first_token is not None else now
        self.last_token, self.generated = now, self.generated + 1
        self.move(RequestStatus.FINISHED if event.finish_reason is not None else RequestStatus.DECODING)
        if self.sink is not None:
            self.sink(event)

    def fail(self, err: BaseException) -> None:
        """A step failed, or it cannot run: FAILED, and the sink gets `err`."""
        self.move(RequestStatus.FAILED)
        if self.sink is not None:
            self.sink(err)
