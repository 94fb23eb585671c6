"""`InPlaceDecodeState`: `DecodeState`'s interface over a `BUFFER_LAYOUT` decode graph.

The graph attends through GroupQueryAttention and writes the new keys/values into the KV buffer
in place (`autocontrast.runtime.kv_buffer`). Row `i` holds `lengths[i]` entries in the first
columns of its buffer row, so rows of different lengths share a batch without padding columns:

- `advance` feeds one token per row; the attention mask is 1 in each row's first length + 1
  columns and its width is the longest row's, which is how the graph learns every row's length;
- `extend` prefills joining rows right-padded together into their own buffer, then appends them;
- `rewind_row` only shortens a row's length: the next step overwrites the forgotten columns;
- `keep` selects rows (a copy, between steps).

>>> state = InPlaceDecodeState(session, pad_token_id=0)  # doctest: +SKIP
>>> out = state.extend([[1, 2, 3], [4, 5]])              # exit logits (2, n_exits, vocab)
>>> out = state.advance(np.array([7, 8]))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from autocontrast.runtime.batch_state import Rewind
from autocontrast.runtime.kv_buffer import KVBuffer, capacity_for
from autocontrast.runtime.row_reshape import Align, pad_ragged
from autocontrast.runtime.session import ExitSession, StepOutput


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One step's inputs for a state's rows, and each row's length once it ran."""

    input_ids: np.ndarray  # (batch, n)
    attention_mask: np.ndarray  # (batch, width)
    position_ids: np.ndarray  # (batch, n)
    lengths_after: np.ndarray  # (batch,)


class InPlaceDecodeState:
    """The batch state of one buffered decode graph. Not thread-safe: one driver at a time."""

    def __init__(self, session: ExitSession, *, pad_token_id: int = 0) -> None:
        self.session = session
        self.pad_token_id = pad_token_id
        self.cache = self._buffer(0, capacity_for(0))
        self._lengths = np.zeros((0,), dtype=np.int64)  # (batch,): entries in each row's cache
        self.fused_outputs: frozenset[str] | None = None  # the fused outputs its steps compute (None: all)

    def _buffer(self, batch: int, capacity: int) -> KVBuffer:
        return KVBuffer(self.session.kv, batch, capacity, device=self.session.device,
                        device_id=self.session.device_id, live_layers=self.session.graph.layers)

    @property
    def batch(self) -> int:
        return len(self._lengths)

    def lengths(self) -> np.ndarray:
        """(batch,) tokens in each row's cache."""
        return self._lengths.copy()

    def extend(self, rows: Sequence[Sequence[int]], *, prompt_lengths: Sequence[int] | None = None,
               columns: int | None = None) -> StepOutput:
        """Prefill `rows` (right-padded together) and add them after the batch's rows.

        Returns the new rows' outputs only: (len(rows), n_exits, vocab). `columns`: room to leave for that
        many entries per row (a prompt whose later chunks `feed` brings), so the buffer does not grow, a
        copy of every layer at once, while they come.
        """
        ids, mask = pad_ragged(rows, pad=self.pad_token_id, align=Align.LEFT)  # (new, width), right-padded
        lengths = mask.sum(axis=1)  # (new,)
        width = ids.shape[1]
        positions = np.broadcast_to(np.arange(width), ids.shape).copy()  # pads' positions are never cached
        buffer = self._buffer(len(rows), capacity_for(max(width, columns or 0) + 1))
        out = self.session.step(ids, mask, positions, buffer, fused=self.fused_outputs)
        if self.batch == 0:
            self.cache = buffer
        else:
            self.cache.append_rows(buffer)
        self._lengths = np.concatenate([self._lengths, lengths])
        return out

    @classmethod
    def seeded(cls, session: ExitSession, entries: Sequence[np.ndarray], *, pad_token_id: int = 0,
               columns: int | None = None) -> InPlaceDecodeState:
        """A one-row state whose buffer already holds `entries` ([(kv_heads, length, head_dim)] of the live
        layers in graph order, as `prefixes()` gives them): a prompt's prefix computed before, fed on with `feed`
        (`columns`: room for that many entries, as `extend`)."""
        state = cls(session, pad_token_id=pad_token_id)
        length = entries[0].shape[1]
        state.cache = state._buffer(1, capacity_for(max(length, columns or 0) + 1))
        state.cache.load([e[None] for e in entries])
        state._lengths = np.array([length], dtype=np.int64)
        return state

    def advance(self, tokens: np.ndarray) -> StepOutput:
        """Feed one token per row: tokens (batch,) int. Returns (batch, n_exits, vocab) outputs."""
        return self.feed(np.asarray(tokens, dtype=np.int64).reshape(self.batch, 1))

    def feed(self, tokens: np.ndarray) -> StepOutput:
        """Feed the same number of tokens to every row: tokens (batch, n) int (a prompt's next chunk, or
        one token each). Returns the last position's outputs: (batch, n_exits, vocab)."""
        step = self.step_inputs(tokens)
        out = self.session.step(step.input_ids, step.attention_mask, step.position_ids, self.cache,
                                fused=self.fused_outputs)
        self.commit(step)
        return out

    def step_inputs(self, tokens: np.ndarray) -> StepInputs:
        """What a step feeding `tokens` (batch, n) to every row runs on (the buffer made room for them); `commit`
        it once the step ran (`feed` does both; a mixed step runs two states' inputs in one call)."""
        tokens = np.asarray(tokens, dtype=np.int64)  # (batch, n)
        after = self._lengths + tokens.shape[1]
        width = int(after.max())
        self.cache.reserve(width)
        mask = (np.arange(width)[None, :] < after[:, None]).astype(np.int64)  # (batch, width)
        positions = self._lengths[:, None] + np.arange(tokens.shape[1])  # (batch, n)
        return StepInputs(tokens, mask, positions, after)

    def commit(self, step: StepInputs) -> None:
        """The rows now hold what `step` fed them."""
        self._lengths = step.lengths_after

    @classmethod
    def empty_row(cls, session: ExitSession, *, columns: int, pad_token_id: int = 0) -> InPlaceDecodeState:
        """A one-row state holding nothing yet, its buffer with room for `columns` entries (a prompt `feed`
        brings in chunks, from its first)."""
        state = cls(session, pad_token_id=pad_token_id)
        state.cache = state._buffer(1, capacity_for(columns + 1))
        state._lengths = np.zeros((1,), dtype=np.int64)
        return state

    def absorb(self, other: InPlaceDecodeState) -> None:
        """Add `other`'s rows (a state over the same graph) after this batch's rows; `other` is spent."""
        if self.batch == 0:
            self.cache = other.cache
        else:
            self.cache.append_rows(other.cache)
        self._lengths = np.concatenate([self._lengths, other._lengths])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (indices into the batch, in that order)."""
        index = np.asarray(rows, dtype=np.int64)
        self._lengths = self._lengths[index]
        self.cache.select(index, columns=int(self._lengths.max()) if len(index) else 0)

    def rewind_row(self, row: int, length: int) -> Rewind:
        """Keep the first `length` cache entries of `row` (its next token goes at position `length`).

        Always `Rewind.KEPT`: the buffer is untouched, the next step overwrites the forgotten columns.
        """
        have = int(self._lengths[row])
        if not 0 <= length <= have:
            raise ValueError(f"cannot rewind a row of {have} cached tokens to {length}")
        self._lengths[row] = length
        return Rewind.KEPT

    def prefixes(self) -> list[list[np.ndarray]]:
        """Each row's cache, [(kv_heads, length, head_dim)] per live cache input: views of the buffer (the
        state is spent after; whoever keeps them keeps that buffer)."""
        arrays = self.cache.views()
        return [[a[i, :, :int(n)] for a in arrays] for i, n in enumerate(self._lengths)]

    def entries(self) -> list[np.ndarray]:
        """Every row's cached entries, rows one after another: [(sum of lengths, kv_heads, head_dim)] in graph order."""
        return [np.concatenate([a[i, :, :n].transpose(1, 0, 2) for i, n in enumerate(self._lengths)])
                for a in self.cache.arrays()]
