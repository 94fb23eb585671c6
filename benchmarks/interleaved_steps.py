"""Median decode-step times of several batch states stepped in turn (for the scripts beside it).

Each state is prefilled with `batch` copies of a real prompt (the first `prompt_tokens` tokens of the
WikiText-2 test split the package carries), then every state takes one step per round, in order, for
`steps` rounds, feeding back its own exit-0 argmax: host drift hits all of them alike.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from autocontrast.data import wikitext_path
from autocontrast.runtime import Generator


def real_prompt(generator: Generator, tokens: int) -> list[int]:
    return generator.encode(wikitext_path("test").read_text(encoding="utf-8")[:200_000])[:tokens]


def median_step_ms(states: list, prompt: list[int], *, batch: int, steps: int) -> list[float]:
    """Each state's median ms per decode step, the states (fresh ones) stepped in turn."""
    tokens, times = [], [[] for _ in states]
    for state in states:
        out = state.extend([prompt] * batch)
        tokens.append(np.argmax(out.exit_logits[:, 0, :], axis=-1))
    for _ in range(steps):
        for i, state in enumerate(states):
            started = time.perf_counter()
            out = state.advance(tokens[i])
            times[i].append(time.perf_counter() - started)
            tokens[i] = np.argmax(out.exit_logits[:, 0, :], axis=-1)
    return [statistics.median(t) * 1000 for t in times]
