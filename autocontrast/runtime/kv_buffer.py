"""`KVBuffer`: the KV cache of a `BUFFER_LAYOUT` decode graph, written in place by each step.

One preallocated buffer per layer and kind, (batch, kv_heads, capacity, head_dim), is bound as
both the graph's past input and its present output (IO binding with the same `OrtValue`), so
GroupQueryAttention writes each row's new keys/values into its next free columns and a step
copies nothing. Row `i` holds its entries in columns [0, length_i); the lengths live with the
decode state (`autocontrast.runtime.inplace_state`), not here: forgetting tokens is bookkeeping.

Reshaping (rows joining or leaving, more capacity) copies, through the host: between steps, once
per change. Capacity grows geometrically in multiples of `CAPACITY_STEP`, so a growing context
reallocates O(log n) times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from autocontrast.bundle import KVCacheSpec
from autocontrast.runtime import huge_pages

CAPACITY_STEP = 256  # columns are allocated in multiples of this


def capacity_for(columns: int) -> int:
    """The capacity to allocate for `columns` entries: the next multiple of CAPACITY_STEP."""
    return max(CAPACITY_STEP, -(-columns // CAPACITY_STEP) * CAPACITY_STEP)


class KVBuffer:
    """Per-layer key and value buffers in graph input order (key then value of layer 0, 1, ...).

    >>> buffer = KVBuffer(spec, batch=2, capacity=256)  # doctest: +SKIP
    >>> session.step(ids, mask, positions, buffer)       # the graph writes into the buffers
    """

    def __init__(self, spec: KVCacheSpec, batch: int, capacity: int, *, device: str = "cpu",
                 device_id: int = 0, live_layers: int | None = None) -> None:
        self.spec, self.batch, self.device, self.device_id = spec, batch, device, device_id
        self.input_names = spec.past_names()
        self.output_names = spec.present_names()
        # buffers the graph writes: a switched graph's early exit passes the layers above it through
        # untouched, so theirs are bound but never written, copied or read (on CPU: never resident)
        self.live = len(self.input_names) if live_layers is None else 2 * live_layers
        shape = (batch, spec.num_kv_heads, capacity, spec.head_dim)
        self._set([np.zeros(shape, dtype=np.dtype(spec.dtype)) for _ in range(self.live)])

    @property
    def capacity(self) -> int:
        return int(self._values[0].shape()[2])

    def binding(self, session: ort.InferenceSession, *, device: str, device_id: int = 0) -> ort.IOBinding:
        """`session`'s IO binding with each buffer bound as the past input and as the present output
        (the step writes in place), presents first. Kept from step to step until the buffers are
        reallocated: a step then binds only its token inputs and its logits (120 binds fewer per
        step for a 30-layer model)."""
        if self._binding is None or self._binding[0] is not session:
            binding = session.io_binding()
            for past, present, value in zip(self.input_names, self.output_names, self._values, strict=True):
                binding.bind_ortvalue_output(present, value)
                binding.bind_ortvalue_input(past, value)
            self._binding = (session, binding)
        return self._binding[1]

    def update(self, present: list[ort.OrtValue], new_tokens: int) -> None:
        """Nothing to take: the presents are the buffers themselves."""

    def devices(self) -> set[str]:
        """Where the buffers live: {'cpu'} or {'cuda'}."""
        return {v.device_name().lower() for v in self._values}

    def arrays(self) -> list[np.ndarray]:
        """Every live buffer as a host array (batch, kv_heads, capacity, head_dim), graph order (copies from a
        device): all of them, or the first 2 * `live_layers`."""
        return [v.numpy() for v in self._values[:self.live]]

    def reserve(self, columns: int) -> None:
        """Make room for `columns` entries per row (copies when the capacity grows)."""
        if columns > self.capacity:
            grown = capacity_for(max(columns, 2 * self.capacity))
            self._set([np.pad(a, ((0, 0), (0, 0), (0, grown - a.shape[2]), (0, 0))) for a in self.arrays()])

    def load(self, arrays: list[np.ndarray]) -> None:
        """Hold `arrays` (the live buffers' first columns: (batch, kv_heads, columns, head_dim), graph order)."""
        self._set(_widen(arrays, self.capacity))

    def select(self, rows: Sequence[int]) -> None:
        """Keep only `rows`, in that order (copies)."""
        index = np.asarray(rows, dtype=np.int64)
        self._set([a[index] for a in self.arrays()])
        self.batch = len(index)

    def append_rows(self, other: KVBuffer) -> None:
        """Add `other`'s rows after this buffer's, at the larger capacity (copies)."""
        columns = max(self.capacity, other.capacity)
        mine, theirs = (_widen(b.arrays(), columns) for b in (self, other))
        self._set([np.concatenate([a, b]) for a, b in zip(mine, theirs, strict=True)])
        self.batch += other.batch

    def _set(self, arrays: list[np.ndarray]) -> None:
        # one block for every layer, in huge pages where the system allows (a long context's step reads
        # all of it); on CPU the OrtValues share these arrays. `arrays`: the live buffers' contents.
        block = huge_pages.empty((len(self.input_names), *arrays[0].shape), arrays[0].dtype)
        for row, array in zip(block, arrays, strict=False):  # rows past the live ones stay unwritten
            row[...] = array
        self._host = list(block)
        self._values = [ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id) for a in self._host]
        self._binding: tuple[ort.InferenceSession, ort.IOBinding] | None = None  # bound to the old buffers
        if self.device != "cpu":
            self._host = []  # the device holds its own copy


def _widen(arrays: list[np.ndarray], columns: int) -> list[np.ndarray]:
    """(batch, kv_heads, capacity, head_dim) -> (batch, kv_heads, columns, head_dim): zero columns after."""
    return [a if a.shape[2] == columns else np.pad(a, ((0, 0), (0, 0), (0, columns - a.shape[2]), (0, 0)))
            for a in arrays]
