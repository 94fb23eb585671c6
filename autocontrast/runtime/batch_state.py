"""The interfaces the stepping engine drives: a batch's decode state, and one that takes prompt chunks.

Three classes implement `BatchState`, one per layout: `DecodeState` (a concatenated KV cache,
`CONCAT_LAYOUT`), `InPlaceDecodeState` (a KV buffer written in place, `BUFFER_LAYOUT`) and
`EncoderDecoderState` (T5: an encoder pass, then a `DecodeState` over the decoder). The first two
are also `ChunkedState`s: a row may be prefilled over several steps (`feed`), start from a prefix
computed before (`seeded`) and then join a running batch (`absorb`). An encoder-decoder row cannot:
its prompt is the encoder's, read in one pass.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from autocontrast.bundle import KVCacheSpec
from autocontrast.runtime.kv_store import KVStore
from autocontrast.runtime.session import ExitSession, StepOutput


class Rewind(enum.Enum):
    """What `BatchState.rewind_row` did with a row's cache."""

    KEPT = "kept"
    """The cache holds the row's first `length` tokens: its next step continues from there."""
    PREFILL_AGAIN = "prefill_again"
    """The cache cannot be cut there (a rewind into an encoder-decoder's prompt changes the encoder's input):
    nothing was changed; the caller removes the row (`keep`) and prefills it anew."""


class StepSession(Protocol):
    """What a decode state runs its steps on: an `ExitSession`, or one that adds inputs to each step (an
    encoder-decoder's decoder, reading its batch's cross-attention KV)."""

    @property
    def kv(self) -> KVCacheSpec: ...

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: KVStore | None, *, fused: Collection[str] | None = None) -> StepOutput: ...


@runtime_checkable
class BatchState(Protocol):
    """Rows of one batch over one decode graph: they join (`extend`), step (`advance`), leave (`keep`)."""

    @property
    def session(self) -> ExitSession | StepSession: ...

    @property
    def batch(self) -> int: ...

    fused_outputs: frozenset[str] | None
    """The fused outputs (by name) its steps compute; None: every one the graph returns."""

    def lengths(self) -> np.ndarray:
        """(batch,) tokens in each row's cache."""
        ...

    def extend(self, rows: Sequence[Sequence[int]], *, prompt_lengths: Sequence[int] | None = None) -> StepOutput:
        """Prefill `rows` and add them after the batch's rows; the new rows' outputs."""
        ...

    def advance(self, tokens: np.ndarray) -> StepOutput:
        """One token per row: (batch,) ids; (batch, n_exits, vocab) outputs."""
        ...

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (indices into the batch, in that order)."""
        ...

    def rewind_row(self, row: int, length: int) -> Rewind:
        """Keep `length` of the row's tokens (prompt + generated): `Rewind.KEPT` when done, its next token
        then goes at position `length`; `Rewind.PREFILL_AGAIN` when this state cannot cut the row there
        (the row is untouched: remove it with `keep` and prefill it anew)."""
        ...


@runtime_checkable
class ChunkedState(BatchState, Protocol):
    """A batch state whose rows may be prefilled in chunks, from a stored prefix, then join another batch."""

    def extend(self, rows: Sequence[Sequence[int]], *, prompt_lengths: Sequence[int] | None = None,
               columns: int | None = None) -> StepOutput:
        """Prefill `rows` and add them after the batch's rows; the new rows' outputs. `columns`: room to
        leave for that many entries per row where the cache has a capacity (a prompt's later chunks)."""
        ...

    def feed(self, tokens: np.ndarray) -> StepOutput:
        """The same number of tokens to every row: (batch, n) ids; the last position's outputs."""
        ...

    def absorb(self, other: ChunkedState) -> None:
        """Take `other`'s rows (same graph, same class) after this batch's rows."""
        ...

    def prefixes(self) -> list[list[np.ndarray]]:
        """Each row's cache: [(kv_heads, length, head_dim)] per cache input, what `seeded` takes."""
        ...
