"""Sampling pieces equal HF's logits processors (the reference the PyTorch models generate with),
and a seeded draw repeats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from autocontrast.runtime import sampling

VOCAB = 101


def _scores(seed: int = 0, batch: int = 3) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, VOCAB)) * 3).astype(np.float32)  # (batch, vocab)


def _hf(processors, scores: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    t = torch.from_numpy(scores.copy())
    ids_t = torch.from_numpy(ids if ids is not None else np.zeros((scores.shape[0], 1), np.int64))
    for p in processors:
        t = p(ids_t, t)
    return t.double().numpy()


def test_greedy_picks_first_maximum():
    scores = np.array([[0.0, 3.0, 3.0, 1.0], [5.0, -np.inf, 0.0, 5.0]])
    np.testing.assert_array_equal(sampling.greedy(scores), [1, 0])


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k_keeps_what_hf_keeps(top_k):
    scores = _scores(top_k)
    ours = sampling.warp(scores, temperature=0.7, top_k=top_k)
    theirs = _hf([TemperatureLogitsWarper(0.7), TopKLogitsWarper(top_k)], scores)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_what_hf_keeps(top_p):
    scores = _scores(int(top_p * 1000))
    ours = sampling.warp(scores, temperature=1.0, top_p=top_p)
    theirs = _hf([TopPLogitsWarper(top_p)], scores)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))


def test_top_k_then_top_p_keeps_what_hf_keeps():
    scores = _scores(11)
    ours = sampling.warp(scores, temperature=1.3, top_k=20, top_p=0.6)
    theirs = _hf([TemperatureLogitsWarper(1.3), TopKLogitsWarper(20), TopPLogitsWarper(0.6)], scores)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_is_hf_repetition_penalty(penalty):
    scores = _scores(5, batch=2)
    seen = np.array([[3, 7, 7, 50], [0, 1, 2, 3]], dtype=np.int64)
    ours = sampling.apply_repetition_penalty(scores, list(seen), penalty)
    theirs = _hf([RepetitionPenaltyLogitsProcessor(penalty)], scores, seen)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_contrast_log_probabilities_and_logits_sample_the_same_distribution():
    logits = _scores(2)
    log_probs = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    a = sampling.sample(sampling.warp(logits, temperature=0.8), np.random.default_rng(3))
    b = sampling.sample(sampling.warp(log_probs, temperature=0.8), np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_same_seed_same_draws_and_other_seed_differs():
    scores = sampling.warp(np.zeros((1, VOCAB)), temperature=1.0)
    draw = lambda seed: [int(sampling.sample(scores, rng)[0]) for rng in [np.random.default_rng(seed)] for _ in range(20)]  # noqa: E731
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_sample_follows_the_distribution():
    probs = np.array([[0.5, 0.3, 0.2, 0.0]])
    rng = np.random.default_rng(0)
    with np.errstate(divide="ignore"):
        scores = np.log(probs)
    draws = np.array([sampling.sample(scores, rng)[0] for _ in range(4000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, probs[0], atol=0.03)
    assert freq[3] == 0.0


def test_sample_never_picks_a_filtered_token():
    scores = sampling.warp(_scores(9, batch=8), temperature=2.0, top_k=3)
    rng = np.random.default_rng(0)
    for _ in range(50):
        picked = sampling.sample(scores, rng)
        assert np.isfinite(scores[np.arange(8), picked]).all()
