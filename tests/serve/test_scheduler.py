"""The scheduler, in process: requests made at the edge (`Model.request`, as the HTTP app makes them) keep
one status from the queue to their end, whether they finish, are cancelled while queued or running, or
are failed by a stop that does not drain; the HTTP app's requests are those same objects."""

from __future__ import annotations

import threading
import time

import pytest
from starlette.testclient import TestClient

from autocontrast.errors import RequestStateError
from autocontrast.runtime import RequestStatus, TokenEvent
from autocontrast.serve.app import ServerConfig, create_app
from autocontrast.serve.scheduler import Scheduler, SchedulerStoppedError

Q, P, D, F = RequestStatus.QUEUED, RequestStatus.PREFILLING, RequestStatus.DECODING, RequestStatus.FINISHED
PROMPT = "Once upon a time, in a small village by the sea"
WAIT_S = 60


class Collect:
    """A sink that keeps every event and says when the request has ended."""

    def __init__(self) -> None:
        self.events: list[TokenEvent | BaseException] = []
        self.first = threading.Event()

    def __call__(self, event: TokenEvent | BaseException) -> None:
        self.events.append(event)
        self.first.set()


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {WAIT_S} s for {what}")
        time.sleep(0.01)


@pytest.fixture()
def scheduler(llama_generator):
    scheduler = Scheduler(llama_generator, max_batch=1, max_queue=4, max_step_tokens=8)
    scheduler.start()
    yield scheduler
    scheduler.stop(drain=False, timeout=WAIT_S)


def test_a_request_is_queued_prefilling_decoding_then_finished_and_its_tokens_are_generates(scheduler,
                                                                                          llama_generator):
    sink = Collect()
    request = llama_generator.request(PROMPT, max_new_tokens=5, ignore_eos=True, sink=sink)
    scheduler.submit(request)
    _until(lambda: request.status.final, "the request to end")
    assert request.history == [Q, P, D, F]
    assert [e.token for e in sink.events] == llama_generator.generate(PROMPT, max_new_tokens=5,
                                                                      ignore_eos=True).token_ids[0]
    _until(lambda: scheduler.running == 0, "its row to leave")


def test_at_debug_level_each_step_logs_its_plan_and_time(scheduler, llama_generator, caplog):
    caplog.set_level("DEBUG", logger="autocontrast.serve")
    request = llama_generator.request(PROMPT, max_new_tokens=3, ignore_eos=True, sink=Collect())
    prompt_tokens = len(request.prompt_ids)
    scheduler.submit(request)
    _until(lambda: request.status.final, "the request to end")
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    # its prompt (under the idle budget: one chunk), then one step per further token, each timed
    assert len(steps) == 3, steps
    assert f"0 decoding, {prompt_tokens} prompt tokens in 1 chunk(s) [row 0: 0-{prompt_tokens}]" in steps[0]
    assert all("1 decoding, 0 prompt tokens in 0 chunk(s)" in line for line in steps[1:])
    assert all(line.endswith(" ms") for line in steps)


def test_a_running_request_cancelled_is_dropped_and_cancelled(scheduler, llama_generator):
    sink = Collect()
    request = llama_generator.request(PROMPT, max_new_tokens=400, ignore_eos=True, sink=sink)
    scheduler.submit(request)
    assert sink.first.wait(WAIT_S)
    request.cancel()
    _until(lambda: request.status.final, "the request to end")
    assert request.history == [Q, P, D, RequestStatus.CANCELLED] and request.generated < 400
    _until(lambda: scheduler.running == 0, "its row to leave")


def test_a_queued_request_cancelled_never_runs(scheduler, llama_generator):
    running = llama_generator.request(PROMPT, max_new_tokens=400, ignore_eos=True, sink=Collect())
    waiting = llama_generator.request("Hi", max_new_tokens=4, sink=Collect())
    scheduler.submit_all([running, waiting])  # one batch slot: the second waits
    waiting.cancel()
    _until(lambda: waiting.status.final, "the queued request to end")
    assert waiting.history == [Q, RequestStatus.CANCELLED] and waiting.generated == 0
    running.cancel()


def test_a_stop_without_drain_fails_what_is_queued(llama_generator):
    scheduler = Scheduler(llama_generator, max_batch=1, max_queue=4)  # never started: everything stays queued
    sink = Collect()
    request = llama_generator.request("Hi", max_new_tokens=4, sink=sink)
    scheduler.submit(request)
    scheduler.stop(drain=False)
    assert request.history == [Q, RequestStatus.FAILED]
    assert len(sink.events) == 1 and isinstance(sink.events[0], SchedulerStoppedError)


def test_only_a_queued_request_is_taken(scheduler, llama_generator):
    request = llama_generator.request("Hi", max_new_tokens=2, sink=Collect())
    scheduler.submit(request)
    _until(lambda: request.status.final, "the request to end")
    with pytest.raises(RequestStateError, match="this one is finished"):
        scheduler.submit(request)


def test_the_http_apps_requests_are_made_once_and_finish(llama_generator, monkeypatch):
    app = create_app(llama_generator, ServerConfig(model_name="tiny"))
    submitted = []
    scheduler = app.state.scheduler
    original = scheduler.submit_all
    monkeypatch.setattr(scheduler, "submit_all", lambda requests: (submitted.extend(requests), original(requests)))
    with TestClient(app) as client:
        body = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "n": 2, "seed": 4,
                                                    "temperature": 1.0, "ignore_eos": True}).json()
    assert len(body["choices"]) == 2 and len(submitted) == 2
    assert [r.history for r in submitted] == [[Q, P, D, F]] * 2
    assert [r.params.seed for r in submitted] == [4, 5]  # each choice its own draw
    assert submitted[0].prompt_ids == submitted[1].prompt_ids == llama_generator.encode(PROMPT)
    assert submitted[0].prompt_ids is not submitted[1].prompt_ids
    assert body["usage"]["prompt_tokens"] == len(submitted[0].prompt_ids)  # the prompt counted once
