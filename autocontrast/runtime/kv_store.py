"""`KVStore`: what a decode step needs of a batch's KV cache, whatever its layout.

Two classes implement it: `KVCache` (`CONCAT_LAYOUT`: the graph concatenates past and new entries,
and the step's presents become the next past) and `KVBuffer` (`BUFFER_LAYOUT`: one preallocated
buffer per layer, written in place). `ExitSession.step` binds a store's past and presents through
`binding` and hands the presents back through `update`; reshaping a batch (`select`,
`append_rows`) is each layout's own business, driven by its decode state.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnxruntime as ort


class KVStore(Protocol):
    input_names: list[str]  # the graph's past inputs, key then value of layer 0, 1, ...
    output_names: list[str]  # its present outputs, same order
    batch: int

    def binding(self, session: ort.InferenceSession, *, device: str, device_id: int = 0) -> ort.IOBinding:
        """An IO binding of `session` with the past bound as inputs and the presents as the first outputs."""
        ...

    def update(self, present: list[ort.OrtValue], new_tokens: int) -> None:
        """After a step: take its present outputs (graph order) as the past of the next."""
        ...

    def devices(self) -> set[str]:
        """Where the entries live."""
        ...

    def arrays(self) -> list[np.ndarray]:
        """Every (live) entry as a host array, (batch, kv_heads, columns, head_dim), graph order."""
        ...
