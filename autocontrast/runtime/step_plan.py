"""`StepPlan`: what one step computes, planned against a token budget before anything runs.

Decode rows come first (one token each: a running stream never waits); the budget left goes to
prompt chunks of joining rows, oldest first, so a long prompt joins over several steps while the
running rows keep their pace (chunked prefill, as vLLM's and llama.cpp's servers schedule). With
no budget every joining row is prefilled whole in the step it joins.

>>> plan_step([0, 1, 2], [Pending(row=3, done=0, total=1900)], budget=64)
StepPlan(decode=(0, 1, 2), chunks=(PromptChunk(row=3, start=0, stop=61, final=False),))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

MIN_CHUNK_TOKENS = 16  # prompt tokens a step gives joining rows even when decode rows fill the budget
PROMPT_TOKENS_PER_DECODE_ROW = 8  # ... and at least this many per decoding row: a bigger batch's step takes
# longer (on CPU about 45 ms at 4 rows, 95 ms at 16 for SmolLM2), so the same relative pause allows a bigger chunk
IDLE_STEP_TOKENS = 512  # the budget of a step with no row decoding: no stream to keep at pace, so larger
# chunks (fewer reads of the weights) while a request arriving meanwhile waits at most one such chunk


@dataclasses.dataclass(frozen=True)
class Pending:
    """A joining row: `done` of its `total` prompt tokens are in its cache."""

    row: int
    done: int
    total: int


@dataclasses.dataclass(frozen=True)
class PromptChunk:
    """Prompt tokens [start, stop) of a joining row; `final`: the row's first token is chosen after it."""

    row: int
    start: int
    stop: int
    final: bool

    @property
    def tokens(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class StepPlan:
    decode: tuple[int, ...]  # rows that get one token each
    chunks: tuple[PromptChunk, ...]  # at most one per joining row

    @property
    def tokens(self) -> int:
        """Tokens this step feeds the model."""
        return len(self.decode) + sum(c.tokens for c in self.chunks)


def step_budget_problem(max_step_tokens: object) -> str | None:
    """What is wrong with a step's token budget (a positive integer, or None for whole prompts), or None.
    The one home of that rule: the stepper, the server's scheduler and its configuration all ask here."""
    if max_step_tokens is None or (isinstance(max_step_tokens, int) and not isinstance(max_step_tokens, bool)
                                   and max_step_tokens >= 1):
        return None
    return f"max_step_tokens ({max_step_tokens!r}) must be a positive integer or None (whole prompts)"


def plan_step(decode: Sequence[int], pending: Sequence[Pending], budget: int | None) -> StepPlan:
    """The step's plan: every decode row, then chunks of `pending` rows (in order) within `budget` tokens.

    `budget` None: every pending row whole. Otherwise prompts get what the decode rows leave, and at
    least MIN_CHUNK_TOKENS and PROMPT_TOKENS_PER_DECODE_ROW per decoding row, so joining rows progress
    however many rows decode; with no row decoding the budget is at least IDLE_STEP_TOKENS.
    """
    chunks = []
    if budget is not None and not decode:
        budget = max(budget, IDLE_STEP_TOKENS)
    left = None if budget is None else max(budget - len(decode), MIN_CHUNK_TOKENS,
                                           PROMPT_TOKENS_PER_DECODE_ROW * len(decode))
    for row in pending:
        if left is not None and left <= 0:
            break
        remaining = row.total - row.done
        take = remaining if left is None else min(remaining, left)
        chunks.append(PromptChunk(row.row, row.done, row.done + take, final=take == remaining))
        if left is not None:
            left -= take
    return StepPlan(tuple(decode), tuple(chunks))
