"""`StepPlan`: what one step computes, planned against a token budget before anything runs.

Decode rows come first (one token each: a running stream never waits); the budget left goes to
prompt chunks of joining rows, oldest first, so a long prompt joins over several steps while the
running rows keep their pace (chunked prefill, as vLLM's and llama.cpp's servers schedule). With
no budget every joining row is prefilled whole in the step it joins.

Beside decoding rows a chunk is charged its attention too: each of its tokens attends to every
entry before it, so the same number of tokens costs more the further into its prompt a chunk is
(on SmolLM2-135M, a mixed step with 64 prompt tokens takes 1.8x as long after 1,900 cached entries as after
100: `benchmarks/mixed_step_cost.py`).
`past_per_token` (`past_entries_per_token`: cached entries whose attention costs as much as a
token's pass through the weights) turns that into tokens, so every step of a long prompt costs
about the same and the running streams' worst pause is its first step's, not its last's.

>>> plan_step([0, 1, 2], [Pending(row=3, done=0, total=1900)], budget=64)
StepPlan(decode=(0, 1, 2), chunks=(PromptChunk(row=3, start=0, stop=61, final=False),))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

MIN_CHUNK_TOKENS = 16  # prompt tokens a step gives joining rows even when decode rows fill the budget
PROMPT_TOKENS_PER_DECODE_ROW = 8  # ... and at least this many per decoding row: a bigger batch's step takes
# longer (on CPU about 45 ms at 4 rows, 95 ms at 16 for SmolLM2), so the same relative pause allows a bigger chunk
IDLE_STEP_TOKENS = 512  # the budget of a step with no row decoding: no stream to keep at pace, so larger
# chunks (fewer reads of the weights) while a request arriving meanwhile waits at most one such chunk
PAST_PER_TOKEN_PER_HIDDEN = 4  # cached entries, per unit of hidden size, whose attention costs one token's pass
# through the weights. A token's pass is ~12 h^2 multiply-adds per layer (~4 h^2 in the attention projections, fewer
# with grouped KV heads; ~8 h^2 in a gated MLP of ~2.7 h), its attention to one entry 2 h: 6 h at equal rates, and
# ONNX Runtime's CPU attention kernel runs at about 2/3 of its GEMM's rate. Profiled on SmolLM2-135M (h = 576;
# `benchmarks/mixed_step_cost.py --profile` at 100 and 1,900 cached entries): MatMul 0.77 ms a token, the chunk's
# attention 0.40 us a token and entry, 3.4 h; 4 h charges attention a little under that.


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


def past_entries_per_token(hidden_size: int) -> int:
    """Cached entries whose attention costs a prompt token as much as its pass through a model's weights."""
    return PAST_PER_TOKEN_PER_HIDDEN * hidden_size


def chunk_cost(tokens: int, past: int, past_per_token: float | None) -> float:
    """What `tokens` prompt tokens after `past` cached entries cost, in tokens: each one plus its attention to
    the entries before it (`past_per_token` None: the tokens alone)."""
    if past_per_token is None:
        return float(tokens)
    return tokens * (1.0 + (past + (tokens - 1) / 2) / past_per_token)


def _tokens_within(left: float, past: int, past_per_token: float | None) -> int:
    """The most prompt tokens after `past` entries whose `chunk_cost` is within `left` (at least one)."""
    if past_per_token is None:
        return max(int(left), 1)
    b = 1.0 + (past - 0.5) / past_per_token  # cost(n) = n^2 / (2 P) + b n
    n = int(past_per_token * (math.sqrt(b * b + 2.0 * left / past_per_token) - b))
    while n > 1 and chunk_cost(n, past, past_per_token) > left:  # float rounding
        n -= 1
    return max(n, 1)


def plan_step(decode: Sequence[int], pending: Sequence[Pending], budget: int | None, *,
              past_per_token: float | None = None) -> StepPlan:
    """The step's plan: every decode row, then chunks of `pending` rows (in order) within `budget` tokens.

    `budget` None: every pending row whole. Otherwise prompts get what the decode rows leave, and at
    least MIN_CHUNK_TOKENS and PROMPT_TOKENS_PER_DECODE_ROW per decoding row, so joining rows progress
    however many rows decode; with no row decoding the budget is at least IDLE_STEP_TOKENS. With rows
    decoding and `past_per_token` given, a chunk's tokens are charged their attention (`chunk_cost`).
    """
    chunks = []
    if budget is not None and not decode:
        budget = max(budget, IDLE_STEP_TOKENS)
    weigh = past_per_token if decode else None  # idle: no stream's pace to keep, the fewest reads of the weights
    left = None if budget is None else float(max(budget - len(decode), MIN_CHUNK_TOKENS,
                                                 PROMPT_TOKENS_PER_DECODE_ROW * len(decode)))
    for row in pending:
        if left is not None and left < 1:
            break
        remaining = row.total - row.done
        take = remaining if left is None else min(remaining, _tokens_within(left, row.done, weigh))
        chunks.append(PromptChunk(row.row, row.done, row.done + take, final=take == remaining))
        if left is not None:
            left -= chunk_cost(take, row.done, weigh)
    return StepPlan(tuple(decode), tuple(chunks))
