"""`DecodeState`: a running batch over one decode graph: KV cache, attention mask, positions per row.

The one place an ONNX decode loop is driven: the stepping engine, export validation and the int8
agreement check all feed tokens through it. It knows nothing about modes or sampling: rows go in
as token ids, exit logits come out. Rows may join (`extend`) and leave (`keep`) between steps, and
each row may be rewound on its own (`rewind_row`), so a serving scheduler can run one shared batch.

Layout: the rows share the cache's columns; row `i` owns the columns where `mask[i]` is 1. A row
that joins is prefilled alone (with the other joiners) and its cache is right-aligned against the
batch's; a rewound row's dropped columns are masked out, and columns no row uses are trimmed.

`open_decode_state(session)` picks the state for the graph's KV layout: this one for a
`CONCAT_LAYOUT` graph, `InPlaceDecodeState` for a `BUFFER_LAYOUT` one (GroupQueryAttention).

>>> state = DecodeState(session, pad_token_id=0)  # doctest: +SKIP
>>> out = state.extend([[1, 2, 3], [4, 5]])       # prefill two rows: exit logits (2, n_exits, vocab)
>>> out = state.advance(np.array([7, 8]))         # one token per row
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autocontrast.bundle import BUFFER_LAYOUT
from autocontrast.runtime.batch_state import Rewind, StepSession
from autocontrast.runtime.inplace_state import InPlaceDecodeState
from autocontrast.runtime.kv_cache import KVCache
from autocontrast.runtime.row_reshape import Align, append_rows, gather, pad_ragged, resize, unused_columns
from autocontrast.runtime.session import ExitSession, StepOutput


def open_decode_state(session: ExitSession, *, pad_token_id: int = 0) -> DecodeState | InPlaceDecodeState:
    """The decode state for `session`'s graph: in place over a KV buffer, or a concatenated cache."""
    if session.kv.layout == BUFFER_LAYOUT:
        return InPlaceDecodeState(session, pad_token_id=pad_token_id)
    return DecodeState(session, pad_token_id=pad_token_id)


class DecodeState:
    """The batch state of one decode graph. Not thread-safe: one driver at a time."""

    def __init__(self, session: StepSession, *, pad_token_id: int = 0) -> None:
        self.session = session
        self.pad_token_id = pad_token_id
        self.cache = KVCache(session.kv, 0)
        self.mask = np.zeros((0, 0), dtype=np.int64)  # (batch, past): 1 where a row has a cache entry
        self.next_position = np.zeros((0,), dtype=np.int64)  # (batch,): position of each row's next token
        self.fused_outputs: frozenset[str] | None = None  # the fused outputs its steps compute (None: all)

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def lengths(self) -> np.ndarray:
        """(batch,) tokens in each row's cache."""
        return self.mask.sum(axis=1)

    def extend(self, rows: Sequence[Sequence[int]], *, prompt_lengths: Sequence[int] | None = None,
               columns: int | None = None) -> StepOutput:
        """Prefill `rows` (prompts, left-padded together) and add them after the batch's rows.

        Returns the new rows' outputs only: (len(rows), n_exits, vocab). `prompt_lengths` is for
        the interface shared with `EncoderDecoderState`: a decoder-only model reads prompt and
        generated tokens alike; `columns` for the one `InPlaceDecodeState` has (a concatenated cache
        has no capacity to leave room in).
        """
        ids, mask = pad_ragged(rows, pad=self.pad_token_id, align=Align.RIGHT)  # (new, width), left-padded
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # (new, width)
        cache = KVCache(self.session.kv, len(rows))
        out = self.session.step(ids, mask, positions, cache, fused=self.fused_outputs)
        if self.batch == 0:
            self.cache, self.mask = cache, mask
        else:
            self.cache.append_rows(cache)
            self.mask = append_rows(self.mask, mask, axis=1, align=Align.RIGHT)
        self.next_position = np.concatenate([self.next_position, positions[:, -1] + 1])
        return out

    @classmethod
    def seeded(cls, session: ExitSession, entries: Sequence[np.ndarray], *, pad_token_id: int = 0,
               columns: int | None = None) -> DecodeState:
        """A one-row state whose cache already holds `entries` ([(kv_heads, length, head_dim)] in graph order,
        as `prefixes()` gives them): a prompt's prefix computed before, fed on with `feed`."""
        state = cls(session, pad_token_id=pad_token_id)
        length = entries[0].shape[1]
        state.cache = KVCache(session.kv, 1)
        state.cache.load([np.ascontiguousarray(e[None]) for e in entries], length)
        state.mask = np.ones((1, length), dtype=np.int64)
        state.next_position = np.array([length], dtype=np.int64)
        return state

    def advance(self, tokens: np.ndarray) -> StepOutput:
        """Feed one token per row: tokens (batch,) int. Returns (batch, n_exits, vocab) outputs."""
        return self.feed(np.asarray(tokens, dtype=np.int64).reshape(self.batch, 1))

    def feed(self, tokens: np.ndarray) -> StepOutput:
        """Feed the same number of tokens to every row: tokens (batch, n) int (a prompt's next chunk, or
        one token each). Returns the last position's outputs: (batch, n_exits, vocab)."""
        tokens = np.asarray(tokens, dtype=np.int64)  # (batch, n)
        count = tokens.shape[1]
        mask = np.concatenate([self.mask, np.ones((self.batch, count), dtype=np.int64)], axis=1)  # (batch, past + n)
        positions = self.next_position[:, None] + np.arange(count)  # (batch, n)
        out = self.session.step(tokens, mask, positions, self.cache, fused=self.fused_outputs)
        self.mask = mask
        self.next_position = self.next_position + count
        return out

    def absorb(self, other: DecodeState) -> None:
        """Add `other`'s rows (a state over the same graph) after this batch's rows; `other` is spent."""
        if self.batch == 0:
            self.cache, self.mask, self.next_position = other.cache, other.mask, other.next_position
            return
        self.cache.append_rows(other.cache)
        self.mask = append_rows(self.mask, other.mask, axis=1, align=Align.RIGHT)
        self.next_position = np.concatenate([self.next_position, other.next_position])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (indices into the batch, in that order); columns no kept row uses are dropped."""
        index = np.asarray(rows, dtype=np.int64)
        first, _ = unused_columns(self.mask[index])  # leading columns no kept row uses: dropped
        self.cache.select(index, first_column=first)
        self.mask = gather([(self.mask, index)], axis=1, width=self.mask.shape[1] - first, align=Align.RIGHT)
        self.next_position = self.next_position[index]

    def rewind_row(self, row: int, length: int) -> Rewind:
        """Keep the first `length` cache entries of `row` (its next token goes at position `length`).

        Always `Rewind.KEPT`: the dropped columns are masked out (and trimmed where no row uses them).
        """
        have = int(self.mask[row].sum())
        if not 0 <= length <= have:
            raise ValueError(f"cannot rewind a row of {have} cached tokens to {length}")
        columns = np.flatnonzero(self.mask[row])
        self.mask[row, columns[length:]] = 0
        self.next_position[row] = length
        _, trailing = unused_columns(self.mask)
        if trailing:  # trailing columns nobody uses: trim them
            last = self.mask.shape[1] - trailing
            self.cache.rewind_to(last)
            self.mask = resize(self.mask, last, axis=1, align=Align.LEFT)
        return Rewind.KEPT

    def prefixes(self) -> list[list[np.ndarray]]:
        """Each row's cache, [(kv_heads, length, head_dim)] per cache input (its own columns only)."""
        arrays = self.cache.arrays()
        firsts = self.mask.shape[1] - self.lengths()
        return [[a[i, :, int(first):] for a in arrays] for i, first in enumerate(firsts)]

    def entries(self) -> list[np.ndarray]:
        """Every row's cached entries, rows one after another: [(sum of lengths, kv_heads, head_dim)] in graph order."""
        real = self.mask.astype(bool)  # (batch, past)
        return [a.transpose(0, 2, 1, 3)[real] for a in self.cache.arrays()]
