"""One request object for every entry point: `generate`, `stream` and `Stepper.add` make a `Request` with
`Model.request` (checked there, once), and its status follows it through the stepper to its end."""

from __future__ import annotations

import pytest

from autocontrast.config import MultiExitConfiguration
from autocontrast.errors import GenerationParameterError, PromptError, RequestStateError
from autocontrast.runtime import GenerationParams, Request, RequestStatus, TokenEvent
from autocontrast.runtime.modes import DecodeMode
from tests.runtime.conftest import CONTRAST

Q, P, D, F = RequestStatus.QUEUED, RequestStatus.PREFILLING, RequestStatus.DECODING, RequestStatus.FINISHED
CANCELLED, FAILED = RequestStatus.CANCELLED, RequestStatus.FAILED
ACD = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST)
PROMPT = "Once upon a time, in a small village by the sea"


def _bare(**fields) -> Request:
    """A request over no model: for the status rules alone."""
    return Request([5, 6], GenerationParams(**fields), DecodeMode(None, "original", (0,)))


def test_a_generate_call_moves_each_request_queued_prefilling_decoding_finished(llama_generator):
    result = llama_generator.generate([PROMPT, "Hi"], max_new_tokens=3, ignore_eos=True)
    assert [r.history for r in result.requests] == [[Q, P, D, F]] * 2
    assert [r.prompt_ids for r in result.requests] == result.prompt_token_ids
    assert [r.generated for r in result.requests] == [3, 3]


def test_a_request_whose_first_token_ends_it_never_decodes(llama_generator):
    (request,) = llama_generator.generate(PROMPT, max_new_tokens=1).requests
    assert request.history == [Q, P, F]


def test_a_stream_decodes_then_finishes_and_its_text_is_generates(llama_generator):
    stream = llama_generator.stream(PROMPT, multi_exit=ACD, max_new_tokens=8, ignore_eos=True)
    assert stream.request.status is P  # submitted: its prompt goes in at the first step
    pieces = [next(stream)]
    assert stream.request.status is D
    pieces += list(stream)
    assert stream.request.history == [Q, P, D, F] and stream.request.generated == 8
    assert "".join(pieces) == llama_generator.generate(PROMPT, multi_exit=ACD, max_new_tokens=8,
                                                       ignore_eos=True).text


def test_closing_a_stream_cancels_its_request_and_ends_it(llama_generator):
    stream = llama_generator.stream(PROMPT, max_new_tokens=50, ignore_eos=True)
    next(stream)
    stream.close()
    assert stream.request.history == [Q, P, D, CANCELLED]
    with pytest.raises(StopIteration):
        next(stream)
    assert stream.request.generated < 50


def test_a_stream_whose_request_is_cancelled_stops_before_its_next_step(llama_generator):
    stream = llama_generator.stream(PROMPT, max_new_tokens=50, ignore_eos=True)
    next(stream)
    done = stream.request.generated
    stream.request.cancel()  # as another thread would
    assert list(stream) == []
    assert stream.request.status is CANCELLED and stream.request.generated == done


def test_closing_a_finished_stream_leaves_it_finished(llama_generator):
    stream = llama_generator.stream(PROMPT, max_new_tokens=2, ignore_eos=True)
    list(stream)
    stream.close()
    assert stream.request.history == [Q, P, D, F]


def test_stepper_add_makes_the_rows_request_and_submit_takes_one_made_by_the_model(llama_generator):
    stepper = llama_generator.stepper(ACD)
    added = stepper.add(PROMPT, max_new_tokens=2)
    request = llama_generator.request("Hi", max_new_tokens=2, multi_exit=ACD)
    assert request.status is Q
    submitted = stepper.submit(request)
    assert stepper.row(submitted).request is request and request.status is P
    assert stepper.row(added).request.prompt_ids == llama_generator.encode(PROMPT)
    assert stepper.row(added).request.mode == stepper.default_mode
    while not stepper.done:
        stepper.step()
    assert stepper.row(submitted).token_ids == llama_generator.generate("Hi", multi_exit=ACD, max_new_tokens=2).token_ids[0]
    assert request.history == [Q, P, D, F]


def test_a_request_is_submitted_once(llama_generator):
    stepper = llama_generator.stepper()
    request = llama_generator.request("Hi", max_new_tokens=2)
    stepper.submit(request)
    with pytest.raises(RequestStateError, match="only a queued request can be submitted; this one is prefilling"):
        llama_generator.stepper().submit(request)


def test_a_request_for_another_graph_is_refused_by_the_stepper(llama_generator):
    stepper = llama_generator.stepper(ACD)  # the exits graph
    request = llama_generator.request("Hi", max_new_tokens=2)  # the original head's own graph
    assert request.mode.graph.name != stepper.graph.name
    with pytest.raises(GenerationParameterError, match="submit it to a stepper made for that mode"):
        stepper.submit(request)
    assert request.status is Q


def test_the_requests_sink_gets_every_event_in_order(llama_generator):
    got: list[TokenEvent | BaseException] = []
    request = llama_generator.request(PROMPT, max_new_tokens=4, ignore_eos=True, sink=got.append)
    stepper = llama_generator.stepper()
    row = stepper.submit(request)
    events = []
    while not stepper.done:
        events += stepper.step()
    assert got == events and [e.token for e in got] == stepper.row(row).token_ids
    assert request.first_token <= request.last_token and request.since_last >= 0


def test_a_failing_step_fails_the_request_and_hands_its_sink_the_error(llama_generator):
    def boom(ids, scores):
        raise RuntimeError("processor broke")

    got: list[TokenEvent | BaseException] = []
    request = llama_generator.request(PROMPT, max_new_tokens=4, logits_processors=(boom,), sink=got.append)
    stepper = llama_generator.stepper()
    stepper.submit(request)
    with pytest.raises(RuntimeError, match="processor broke"):
        stepper.step()
    assert request.history == [Q, P, FAILED]
    assert len(got) == 1 and str(got[0]) == "processor broke"


def test_a_rewound_finished_row_is_decoding_again(llama_generator):
    stepper = llama_generator.stepper()
    row = stepper.add(PROMPT, max_new_tokens=3, ignore_eos=True)
    while not stepper.done:
        stepper.step()
    prompt = len(stepper.row(row).prompt_ids)
    stepper.rewind_to(row, prompt + 1)
    assert stepper.row(row).request.history == [Q, P, D, F, D]
    stepper.step()
    stepper.step()
    assert stepper.row(row).request.status is F


def test_model_request_checks_the_prompt_the_length_and_the_mode_where_it_is_made(llama_generator):
    limit = llama_generator.manifest.max_positions
    with pytest.raises(PromptError, match="maximum positions"):
        llama_generator.request([5] * (limit - 4), max_new_tokens=8)
    with pytest.raises(GenerationParameterError, match="outside the vocabulary"):
        llama_generator.request("Hi", stop_token_ids=(10**7,))
    exit_1 = MultiExitConfiguration(use_original_head=False, output_layer_index=1)
    with pytest.raises(GenerationParameterError, match="cannot serve"):
        llama_generator.request("Hi", multi_exit=exit_1, graph=llama_generator.mode().graph)  # the head's own graph


def test_fit_context_cuts_max_new_tokens_to_what_the_prompt_leaves(llama_generator):
    limit = llama_generator.manifest.max_positions
    request = llama_generator.request([5] * (limit - 4), max_new_tokens=64, fit_context=True)
    assert request.params.max_new_tokens == 4


def test_a_conversation_is_encoded_through_the_chat_template(llama_generator):
    messages = [{"role": "user", "content": "Hi there"}]
    request = llama_generator.request(messages, chat=True)
    assert request.prompt_ids == llama_generator.encode_chat(messages) == llama_generator.encode("Hi there", chat=True)


@pytest.mark.parametrize("path, refused", [
    ([P, CANCELLED], P),  # cancelled: ended
    ([P, D, F], RequestStatus.CANCELLED),  # finished: not cancelled after the fact
    ([P, FAILED], D),  # failed: ended
    ([], D),  # a queued request has no token yet
])
def test_a_request_refuses_a_move_its_status_does_not_allow(path, refused):
    request = _bare()
    for status in path:
        request.move(status)
    with pytest.raises(RequestStateError, match=f"cannot become {refused.value}"):
        request.move(refused)
    assert request.history == [Q, *path]


def test_copies_of_a_request_start_afresh():
    import dataclasses

    request = _bare(seed=1)
    request.move(P)
    request.cancel()
    other = dataclasses.replace(request, params=GenerationParams(seed=2))
    assert other.history == [Q] and other.status is Q and not other.cancel_requested
