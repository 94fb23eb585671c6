"""Choosing the next token from scores: pure functions over arrays, as HF `generate()` does it.

Order as in HF: repetition penalty (then OpenAI's presence/frequency penalties and logit_bias, which
HF does not have), then temperature, top-k, top-p, then sample (or argmax).
Scores may be logits or log-probabilities (the contrast); both mean the same distribution.

>>> import numpy as np
>>> greedy(np.array([[0.1, 2.0, -1.0]]))
array([1])
"""

from __future__ import annotations

import numpy as np


def greedy(scores: np.ndarray) -> np.ndarray:
    """(batch, vocab) -> (batch,) int64: the first highest-scoring token of each row."""
    return np.argmax(scores, axis=-1).astype(np.int64)


def apply_repetition_penalty(scores: np.ndarray, seen: list[np.ndarray], penalty: float) -> np.ndarray:
    """HF's repetition penalty: a seen token's negative score is multiplied by `penalty`, a positive
    one divided. scores (batch, vocab); seen[row] are the row's prompt and generated ids."""
    if penalty == 1.0:
        return scores
    scores = scores.copy()
    for row, ids in enumerate(seen):
        ids = np.unique(ids)
        picked = scores[row, ids]
        scores[row, ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return scores


def apply_presence_frequency(scores: np.ndarray, generated: list[np.ndarray], presence: float,
                             frequency: float) -> np.ndarray:
    """OpenAI's presence and frequency penalties: a token generated c times loses `frequency` * c and, if
    c > 0, `presence` once. scores (batch, vocab); generated[row]: the row's generated ids."""
    if presence == 0.0 and frequency == 0.0:
        return scores
    scores = scores.astype(np.float64)
    for row, ids in enumerate(generated):
        tokens, counts = np.unique(ids, return_counts=True)
        scores[row, tokens] -= frequency * counts + presence
    return scores


def apply_logit_bias(scores: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    """Add `bias` ({token id: value}) to every row's scores (batch, vocab)."""
    scores = scores.astype(np.float64)
    ids = np.fromiter(bias, dtype=np.int64, count=len(bias))
    scores[:, ids] += np.fromiter(bias.values(), dtype=np.float64, count=len(bias))
    return scores


def most_likely(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of one row of log-probabilities (vocab,), as (id, log-probability), most likely
    first (ties: lower id first)."""
    if k <= 0:
        return []
    top = np.argpartition(-logprobs, k - 1)[:k] if k < logprobs.size else np.arange(logprobs.size)
    top = top[np.lexsort((top, -logprobs[top]))]
    return [(int(t), float(logprobs[t])) for t in top]


def warp(scores: np.ndarray, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Temperature, then top-k, then top-p (nucleus) filtering; filtered tokens get -inf. (batch, vocab)."""
    scores = scores.astype(np.float64) / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = -np.partition(-scores, top_k - 1, axis=-1)[:, top_k - 1:top_k]  # (batch, 1)
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(-scores, axis=-1, kind="stable")
        sorted_probs = softmax(np.take_along_axis(scores, order, axis=-1))
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the tokens ranked above
        drop_sorted = before >= top_p  # keep the smallest prefix whose mass reaches top_p (>= 1 token)
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        scores = np.where(drop, -np.inf, scores)
    return scores


def softmax(scores: np.ndarray) -> np.ndarray:
    top = np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(scores - top)
    return weights / weights.sum(axis=-1, keepdims=True)


def sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(batch, vocab) warped scores -> (batch,) int64 drawn from softmax(scores), one uniform per row."""
    probs = softmax(scores)
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random(scores.shape[0]) * cdf[:, -1]
    return np.minimum((cdf < draws[:, None]).sum(axis=-1), scores.shape[-1] - 1).astype(np.int64)
