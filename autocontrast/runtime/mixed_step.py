"""One step of a batch's decode rows and a joining prompt's chunk through a MIXED graph: one pass over the weights.

A stepper with a chunked prompt otherwise runs two calls a step (the batch's decode, then the chunk in the
prompt's own state), each reading every weight; a MIXED graph (`acd-export --mixed-step`) runs every op
but attention over both calls' tokens as one flat sequence, and attention per part over each part's own
KV buffer. The two states stay as they are: the batch's rows in its buffer, the prompt in its own.

>>> batch_out, chunk_out = mixed_step(mixed_session, batch, np.array([7, 8]), prompt, np.array([[1, 2, 3]]))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from autocontrast.runtime.inplace_state import InPlaceDecodeState
from autocontrast.runtime.session import ExitSession, StepOutput


def mixed_step(session: ExitSession, batch: InPlaceDecodeState, tokens: np.ndarray, chunk: InPlaceDecodeState,
               chunk_tokens: np.ndarray, *, fused: Collection[str] | None = None) -> tuple[StepOutput, StepOutput]:
    """Feed `tokens` (batch,) to `batch`'s rows and `chunk_tokens` (rows, n) to `chunk`'s in one call of
    `session` (a MIXED graph over the batch's decode graph); the outputs of each, as `advance` and `feed` give
    them."""
    decode = batch.step_inputs(np.asarray(tokens, dtype=np.int64).reshape(batch.batch, 1))
    joining = chunk.step_inputs(chunk_tokens)
    out = session.step_mixed((decode.input_ids, decode.attention_mask, decode.position_ids, batch.cache),
                             (joining.input_ids, joining.attention_mask, joining.position_ids, chunk.cache),
                             fused=fused)
    batch.commit(decode)
    chunk.commit(joining)
    return out.rows(slice(0, batch.batch)), out.rows(slice(batch.batch, None))
