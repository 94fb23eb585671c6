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

from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort

from autocontrast.bundle import KVCacheSpec
from autocontrast.runtime.kv_pool import default_pool
from autocontrast.runtime.row_reshape import Align, gather

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
        self._set(default_pool().take((len(self.input_names), batch, spec.num_kv_heads, capacity, spec.head_dim),
                                      np.dtype(spec.dtype)))

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
            self.bind(binding)
            self._binding = (session, binding)
        return self._binding[1]

    def bind(self, binding: ort.IOBinding, *, rename: Callable[[str], str] | None = None) -> None:
        """Bind each buffer in `binding` as its past input and its present output (the step writes in place), under
        its names `rename`d (a mixed-step graph's chunk buffers: `bundle.chunk_name`)."""
        for past, present, value in zip(self.input_names, self.output_names, self._values, strict=True):
            binding.bind_ortvalue_output(rename(present) if rename else present, value)
            binding.bind_ortvalue_input(rename(past) if rename else past, value)

    def update(self, present: list[ort.OrtValue], new_tokens: int) -> None:
        """Nothing to take: the presents are the buffers themselves."""

    def devices(self) -> set[str]:
        """Where the buffers live: {'cpu'} or {'cuda'}."""
        return {v.device_name().lower() for v in self._values}

    def arrays(self) -> list[np.ndarray]:
        """Every live buffer as a host array (batch, kv_heads, capacity, head_dim), graph order (copies from a
        device): all of them, or the first 2 * `live_layers`."""
        return [v.numpy() for v in self._values[:self.live]]

    def views(self) -> list[np.ndarray]:
        """The live buffers as host arrays without a copy where they live on the host (CPU: the block's own
        views, which the next step writes into), else host copies."""
        return self._host[:self.live] if self._host else self.arrays()

    def reserve(self, columns: int) -> None:
        """Make room for `columns` entries per row (copies when the capacity grows)."""
        if columns > self.capacity:
            self._rebuild([(self.views(), np.arange(self.batch))], capacity_for(max(columns, 2 * self.capacity)))

    def load(self, arrays: list[np.ndarray]) -> None:
        """Hold `arrays` (the live buffers' first columns: (batch, kv_heads, columns, head_dim), graph order)."""
        self._rebuild([(arrays, np.arange(arrays[0].shape[0]))], self.capacity)

    def select(self, rows: Sequence[int], *, columns: int | None = None) -> None:
        """Keep only `rows`, in that order (one copy); `columns`: the entries the kept rows hold, so the
        capacity may shrink to fit them (default: keep it)."""
        index = np.asarray(rows, dtype=np.int64)
        capacity = self.capacity if columns is None else min(self.capacity, capacity_for(columns + 1))
        self._rebuild([(self.views(), index)], capacity)

    def append_rows(self, other: KVBuffer) -> None:
        """Add `other`'s rows after this buffer's, at the larger capacity (one copy of each)."""
        self._rebuild([(self.views(), np.arange(self.batch)), (other.views(), np.arange(other.batch))],
                      max(self.capacity, other.capacity))

    def _rebuild(self, sources: list[tuple[list[np.ndarray], np.ndarray]], capacity: int) -> None:
        """New buffers of `capacity` columns holding the chosen rows of each source in turn, each value copied
        once, in a block from the process's `KVPool` (memory touched before where one fits: a stall-free
        reshape); the columns past each row's are left as the block had them (never read)."""
        batch = sum(len(rows) for _, rows in sources)
        first = sources[0][0][0]
        block = default_pool().take((len(self.input_names), batch, first.shape[1], capacity, first.shape[3]),
                                    first.dtype)
        for i in range(len(sources[0][0])):  # the live inputs; those past them stay unwritten
            gather([(arrays[i], rows) for arrays, rows in sources], axis=2, width=capacity, align=Align.LEFT,
                   out=block[i])
        self.batch = batch
        self._set(block)

    def _set(self, block: np.ndarray) -> None:
        # one block for every layer, from the pool (in huge pages where the system allows: a long context's
        # step reads all of it); on CPU the OrtValues share these arrays, and the block goes back to the
        # pool when the last of them (and of any views a prefix cache keeps) goes
        self._host = list(block)
        self._values = [ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id) for a in self._host]
        self._binding: tuple[ort.InferenceSession, ort.IOBinding] | None = None  # bound to the old buffers
        if self.device != "cpu":
            self._host = []  # the device holds its own copy


