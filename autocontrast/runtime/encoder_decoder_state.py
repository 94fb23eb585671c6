"""`EncoderDecoderState`: `DecodeState`'s interface over an encoder-decoder bundle (T5).

A row is a prompt (the encoder's input) and the decoder's tokens: the start token, then what was
generated. Joining rows are encoded once (`EncoderSession`), and their cross-attention KV becomes
extra per-row inputs of every decoder step; it follows the rows when rows join or leave, as the
decoder's own KV cache does (that part is a plain `DecodeState` over the decoder graph: decoder
positions and masks work exactly as a decoder-only model's, the first token at position 0).

The stepping engine drives it with the rows' whole token lists (prompt + generated) and prompt
lengths, as it drives a decoder-only model; this class maps them onto encoder and decoder.

>>> state = EncoderDecoderState(encoder, session, start_token_id=0)  # doctest: +SKIP
>>> out = state.extend([[37, 1782, 1], [8774, 1]], prompt_lengths=[3, 2])  # the start token's logits
>>> out = state.advance(np.array([7, 8]))                                    # one token per row
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from autocontrast.runtime.batch_state import Rewind
from autocontrast.runtime.decode_state import DecodeState
from autocontrast.runtime.encoder import CrossKV, EncoderSession
from autocontrast.runtime.session import ExitSession, StepOutput


class _WithCross:
    """The decoder session as `DecodeState` sees it (a `StepSession`): each step also reads the current `cross`."""

    def __init__(self, session: ExitSession, cross: CrossKV) -> None:
        self.session, self.kv, self.cross = session, session.kv, cross

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: object, *, fused: Collection[str] | None = None) -> StepOutput:
        return self.session.step(input_ids, attention_mask, position_ids, cache, extra=self.cross.feeds(), fused=fused)


class EncoderDecoderState:
    """The batch state of one encoder-decoder decode graph. Not thread-safe: one driver at a time."""

    def __init__(self, encoder: EncoderSession, session: ExitSession, *, start_token_id: int,
                 pad_token_id: int = 0) -> None:
        self.encoder = encoder
        self.start_token_id = start_token_id
        self.cross = CrossKV.empty(encoder.spec, num_kv_heads=session.kv.num_kv_heads, head_dim=session.kv.head_dim)
        self._session = _WithCross(session, self.cross)
        self.decoder = DecodeState(self._session, pad_token_id=pad_token_id)
        self.prompt_lengths: list[int] = []

    @property
    def session(self) -> ExitSession:
        return self._session.session

    @property
    def fused_outputs(self) -> frozenset[str] | None:
        return self.decoder.fused_outputs

    @fused_outputs.setter
    def fused_outputs(self, outputs: frozenset[str] | None) -> None:
        self.decoder.fused_outputs = outputs

    @property
    def batch(self) -> int:
        return self.decoder.batch

    def lengths(self) -> np.ndarray:
        """(batch,) tokens in each row's decoder cache."""
        return self.decoder.lengths()

    def extend(self, rows: Sequence[Sequence[int]], *, prompt_lengths: Sequence[int]) -> StepOutput:
        """Encode each row's prompt (its first `prompt_lengths` tokens), prefill the decoder with the start
        token and the rest, and add the rows after the batch's. Returns the new rows' outputs only."""
        joining = self.encoder.encode([list(r[:n]) for r, n in zip(rows, prompt_lengths, strict=True)])
        self._session.cross = joining
        out = self.decoder.extend([[self.start_token_id] + list(r[n:]) for r, n in zip(rows, prompt_lengths,
                                                                                          strict=True)])
        self.cross = self.cross.append(joining) if self.cross.batch else joining
        self._session.cross = self.cross
        self.prompt_lengths += list(prompt_lengths)
        return out

    def advance(self, tokens: np.ndarray) -> StepOutput:
        """Feed one token per row: tokens (batch,). A row rewound to its prompt feeds the start token."""
        tokens = np.where(self.decoder.lengths() == 0, self.start_token_id, np.asarray(tokens, dtype=np.int64))
        return self.decoder.advance(tokens)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (indices into the batch, in that order)."""
        self.decoder.keep(rows)
        self.cross = self.cross.select(rows)
        self._session.cross = self.cross
        self.prompt_lengths = [self.prompt_lengths[i] for i in rows]

    def rewind_row(self, row: int, length: int) -> Rewind:
        """Keep the first `length` of the row's tokens (prompt + generated) in the cache: `Rewind.KEPT`, or
        `Rewind.PREFILL_AGAIN` when that cuts into the prompt (the encoder's input changes; nothing is touched)."""
        kept = length + 1 - self.prompt_lengths[row]  # decoder entries: start + generated before the last
        if kept < 0:
            return Rewind.PREFILL_AGAIN
        return self.decoder.rewind_row(row, kept)
