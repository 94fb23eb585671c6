"""The stepping engine on a real exported tiny bundle: rows join, leave, rewind and finish on their
own, and every row's tokens equal what `generate` gives that prompt alone."""

from __future__ import annotations

import numpy as np
import pytest

from autocontrast.config import MultiExitConfiguration
from autocontrast.errors import GenerationParameterError, RowError, UnknownExitError
from autocontrast.runtime.contrast import contrast_scores
from tests.runtime.conftest import CONTRAST

ACD = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST)
NUMPY_ACD = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST, alpha=0.3)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea", "Hi", "1, 2, 3,"]
N = 10


def _alone(generator, prompt, config=ACD, **fields):
    return generator.generate(prompt, multi_exit=config, max_new_tokens=N, ignore_eos=True, **fields).token_ids[0]


def _run(stepper):
    """Step until done; returns {row: tokens}."""
    step = 0
    while not stepper.done:
        stepper.step()
        step += 1
    return step


@pytest.mark.parametrize("config", [MultiExitConfiguration(), ACD], ids=["original", "contrast"])
def test_rows_joining_a_running_batch_equal_their_prompt_alone(llama_generator, config):
    stepper = llama_generator.stepper(config)
    rows = {stepper.add(PROMPTS[0], max_new_tokens=N, ignore_eos=True): PROMPTS[0]}
    for prompt in PROMPTS[1:]:  # each joins after the others have taken a few steps
        for _ in range(3):
            stepper.step()
        rows[stepper.add(prompt, max_new_tokens=N, ignore_eos=True)] = prompt
    _run(stepper)
    for row, prompt in rows.items():
        assert stepper.row(row).token_ids == _alone(llama_generator, prompt, config)


def test_rows_of_different_modes_share_one_graph(llama_generator):
    # the fused contrast, the NumPy contrast (other alpha) and one exit all run on the exits graph
    stepper = llama_generator.stepper(ACD)
    exit_2 = MultiExitConfiguration(use_original_head=False, output_layer_index=2)
    configs = [ACD, NUMPY_ACD, exit_2]
    rows = [stepper.add(PROMPTS[i], max_new_tokens=N, ignore_eos=True, multi_exit=c) for i, c in enumerate(configs)]
    _run(stepper)
    for i, (row, config) in enumerate(zip(rows, configs, strict=True)):
        assert stepper.row(row).token_ids == _alone(llama_generator, PROMPTS[i], config)


def test_a_dropped_row_stops_and_the_others_are_unchanged(llama_generator):
    stepper = llama_generator.stepper(ACD)
    keep = stepper.add(PROMPTS[1], max_new_tokens=N, ignore_eos=True)
    gone = stepper.add(PROMPTS[0], max_new_tokens=N, ignore_eos=True)
    for _ in range(4):
        stepper.step()
    dropped = stepper.drop(gone)
    assert len(dropped.token_ids) == 4
    assert gone not in stepper.running and stepper.state.batch == 1
    _run(stepper)
    assert stepper.row(keep).token_ids == _alone(llama_generator, PROMPTS[1])
    with pytest.raises(RowError, match="not in this stepper"):
        stepper.row(gone)


def test_rows_finish_on_their_own_and_leave_the_batch(llama_generator):
    stepper = llama_generator.stepper(ACD)
    short = stepper.add(PROMPTS[0], max_new_tokens=3, ignore_eos=True)
    long = stepper.add(PROMPTS[1], max_new_tokens=N, ignore_eos=True)
    events = [stepper.step() for _ in range(3)]
    assert [e.finish_reason for e in events[2] if e.row == short] == ["length"]
    assert stepper.running == [long]
    stepper.step()
    assert stepper.state.batch == 1  # the finished row's cache is gone
    _run(stepper)
    assert stepper.row(short).finish_reason == "length" and len(stepper.row(short).token_ids) == 3
    assert stepper.row(long).token_ids == _alone(llama_generator, PROMPTS[1])


def test_rewind_replays_the_same_tokens_and_logits(llama_generator):
    stepper = llama_generator.stepper(ACD)
    row = stepper.add(PROMPTS[1], max_new_tokens=N, ignore_eos=True)
    logits = []
    while not stepper.done:
        stepper.step()
        logits.append(stepper.exit_logits(row).copy())
    first = list(stepper.row(row).token_ids)
    prompt_len = len(stepper.row(row).prompt_ids)
    stepper.rewind_to(row, prompt_len + 4)  # keep 4 generated tokens; a finished row comes back
    assert stepper.row(row).token_ids == first[:4] and not stepper.row(row).done
    stepper.step()
    np.testing.assert_allclose(stepper.exit_logits(row), logits[4], rtol=0, atol=1e-5)
    _run(stepper)
    assert stepper.row(row).token_ids == first


def test_rewind_of_one_row_leaves_the_other_rows_alone(llama_generator):
    stepper = llama_generator.stepper(ACD)
    a = stepper.add(PROMPTS[0], max_new_tokens=N, ignore_eos=True)
    b = stepper.add(PROMPTS[2], max_new_tokens=N, ignore_eos=True)
    for _ in range(6):
        stepper.step()
    stepper.rewind_to(a, len(stepper.row(a).prompt_ids) + 2)
    _run(stepper)
    assert stepper.row(a).token_ids == _alone(llama_generator, PROMPTS[0])
    assert stepper.row(b).token_ids == _alone(llama_generator, PROMPTS[2])


def test_each_step_exposes_every_exit_and_the_mode_scores(llama_generator):
    stepper = llama_generator.stepper(ACD)
    assert set(CONTRAST) <= set(stepper.exits)
    row = stepper.add(PROMPTS[0], max_new_tokens=3, ignore_eos=True)
    while not stepper.done:
        events = stepper.step()
        upper, lower = stepper.exit_logits(row, CONTRAST[0]), stepper.exit_logits(row, CONTRAST[1])
        assert stepper.exit_logits(row).shape == (len(stepper.exits), llama_generator.manifest.vocab_size)
        # the graph's fused contrast (traced from the torch formula) against the NumPy formula
        expected = contrast_scores(upper[None], lower[None])[0]
        np.testing.assert_allclose(stepper.scores(row), expected, rtol=0, atol=1e-4)
        assert events[0].token == int(np.argmax(stepper.scores(row)))


def test_stepping_api_errors_are_typed(llama_generator):
    stepper = llama_generator.stepper(MultiExitConfiguration())
    row = stepper.add(PROMPTS[0], max_new_tokens=2)
    with pytest.raises(RowError, match="call step"):
        stepper.exit_logits(row)
    with pytest.raises(RowError):
        stepper.drop(99)
    with pytest.raises(GenerationParameterError, match="cannot serve"):
        stepper.add(PROMPTS[0], multi_exit=MultiExitConfiguration(use_original_head=False, output_layer_index=1))
    stepper.step()
    with pytest.raises(UnknownExitError, match="not returned by graph"):
        stepper.exit_logits(row, 1)
    with pytest.raises(GenerationParameterError, match="rewind length"):
        stepper.rewind_to(row, 10_000)


def test_events_text_joins_to_the_row_text(llama_generator):
    stepper = llama_generator.stepper(ACD)
    row = stepper.add(PROMPTS[1], max_new_tokens=16)
    pieces = []
    while not stepper.done:
        pieces += [e.text for e in stepper.step()]
    assert "".join(pieces) == stepper.row(row).text == llama_generator.generate(
        PROMPTS[1], multi_exit=ACD, max_new_tokens=16).text
