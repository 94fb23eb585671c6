"""OpenAI's sampling knobs in the runtime, each against an independent reference computed from the
model's own logits (the score graph): presence/frequency penalties, logit_bias, and the log-probabilities
of the chosen tokens and their alternatives."""

from __future__ import annotations

import numpy as np
import pytest

from autocontrast.config import MultiExitConfiguration
from autocontrast.errors import GenerationParameterError

PROMPT = "Once upon a time, in a small village by the sea"
N = 10


def _logits(generator, ids):
    """The original head's logits of the last position of `ids`, from the score graph."""
    return generator.exit_logits_all_positions([ids], ["original"])[0][-1, 0].astype(np.float64)


def _log_softmax(x):
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (0.0, 1.0), (-0.5, 2.0)])
def test_presence_and_frequency_penalties_follow_openais_formula(llama_generator, presence, frequency):
    prompt = llama_generator.encode(PROMPT)
    want: list[int] = []
    for _ in range(N):  # OpenAI: logit - count * frequency - (count > 0) * presence, over generated tokens
        logits = _logits(llama_generator, prompt + want)
        counts = np.bincount(np.array(want, dtype=np.int64), minlength=logits.size)
        want.append(int(np.argmax(logits - counts * frequency - (counts > 0) * presence)))
    got = llama_generator.generate(prompt, max_new_tokens=N, ignore_eos=True, presence_penalty=presence,
                                   frequency_penalty=frequency).token_ids[0]
    assert got == want


def test_logit_bias_is_added_to_the_scores(llama_generator):
    prompt = llama_generator.encode(PROMPT)
    plain = llama_generator.generate(prompt, max_new_tokens=N, ignore_eos=True).token_ids[0]
    banned, favoured = plain[0], 5
    got = llama_generator.generate(prompt, max_new_tokens=N, ignore_eos=True,
                                   logit_bias={banned: -100.0, favoured: 100.0}).token_ids[0]
    assert got == [favoured] * N
    mild = llama_generator.generate(prompt, max_new_tokens=1, ignore_eos=True, logit_bias={banned: -100.0})
    assert mild.token_ids[0][0] == int(np.argmax(_logits(llama_generator, prompt) - 100.0 * (np.arange(
        _logits(llama_generator, prompt).size) == banned)))


def test_logprobs_are_the_log_softmax_of_the_modes_scores(llama_generator):
    prompt = llama_generator.encode(PROMPT)
    stepper = llama_generator.stepper()
    stepper.add(prompt, max_new_tokens=N, ignore_eos=True, logprobs=4)
    events = [e for _ in range(N) for e in stepper.step()]
    tokens = [e.token for e in events]
    for i, event in enumerate(events):
        want = _log_softmax(_logits(llama_generator, prompt + tokens[:i]))
        assert event.logprob == pytest.approx(want[event.token], abs=1e-4)
        assert [t for t, _ in event.top_logprobs] == list(np.argsort(-want, kind="stable")[:4])
        assert np.allclose([lp for _, lp in event.top_logprobs], np.sort(want)[::-1][:4], atol=1e-4)


def test_contrast_logprobs_leave_out_implausible_tokens(llama_generator):
    from tests.runtime.conftest import CONTRAST

    acd = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST, alpha=0.5)
    stepper = llama_generator.stepper(acd)
    stepper.add(PROMPT, max_new_tokens=4, ignore_eos=True, logprobs=20)
    for event in (e for _ in range(4) for e in stepper.step()):
        assert event.top_logprobs[0][0] == event.token  # greedy picks the most likely under the contrast
        probs = np.exp([lp for _, lp in event.top_logprobs])
        assert probs.sum() <= 1 + 1e-9 and np.isfinite(event.logprob)


@pytest.mark.parametrize("fields,match", [
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(logit_bias={1: 101}), "logit_bias"), (dict(logit_bias={"a": 1}), "logit_bias"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=True), "logprobs")])
def test_bad_knobs_are_typed_errors(llama_generator, fields, match):
    with pytest.raises(GenerationParameterError, match=match):
        llama_generator.generate(PROMPT, max_new_tokens=2, **fields)


def test_a_logit_bias_outside_the_vocabulary_is_refused(llama_generator):
    with pytest.raises(GenerationParameterError, match="outside the vocabulary"):
        llama_generator.generate(PROMPT, max_new_tokens=2, logit_bias={10**7: 1.0})


def test_exit_logprobs_are_each_exits_own_log_softmax(llama_generator):
    from tests.runtime.conftest import CONTRAST

    acd = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST)
    prompt = llama_generator.encode(PROMPT)
    stepper = llama_generator.stepper(acd)
    stepper.add(prompt, max_new_tokens=5, ignore_eos=True, logprobs=3, exit_logprobs=True)
    events = [e for _ in range(5) for e in stepper.step()]
    tokens = [e.token for e in events]
    logits = llama_generator.exit_logits_all_positions([prompt + tokens], list(CONTRAST))[0].astype(np.float64)
    for i, event in enumerate(events):
        assert [e.exit for e in event.exit_logprobs] == [str(x) for x in CONTRAST]  # upper, then lower
        for which, read in enumerate(event.exit_logprobs):
            want = _log_softmax(logits[len(prompt) - 1 + i, which])
            assert read.logprob == pytest.approx(want[event.token], abs=1e-4)
            assert [t for t, _ in read.top] == list(np.argsort(-want, kind="stable")[:3])


def test_exit_logprobs_need_logprobs(llama_generator):
    with pytest.raises(GenerationParameterError, match="exit_logprobs"):
        llama_generator.generate(PROMPT, max_new_tokens=2, exit_logprobs=True)
