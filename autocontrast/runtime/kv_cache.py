"""The KV cache of a running batch: what each decode step feeds back as its past.

The exported graphs concatenate past and new keys/values inside the graph, so between steps the
cache holds ONNX Runtime's own present outputs and binds them as the next step's past with IO
binding: no copy to NumPy and back, no per-step host allocation, and on CUDA the cache never
leaves the device. Reshaping the batch (rows joining, leaving, rewinding) copies, through the host:
that happens between steps, once per change, never per token.

Rows are left-aligned to a common width: row `i`'s entries sit in the columns where the batch's
attention mask is 1; every other column is padding that attention never reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from autocontrast.bundle import KVCacheSpec
from autocontrast.runtime.row_reshape import Align, append_rows, gather, resize


class KVCache:
    """Past keys/values of every layer, in graph input order: key then value of layer 0, 1, ...

    Each entry is (batch, kv_heads, past, head_dim), a NumPy array (a fresh or reshaped cache) or
    an `OrtValue` produced by the previous step (on the session's device).
    """

    def __init__(self, spec: KVCacheSpec, batch: int) -> None:
        self.spec = spec
        self.batch = batch
        empty = np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), dtype=np.dtype(spec.dtype))
        self._values: list[Any] = [empty] * (2 * spec.num_layers)
        self.length = 0  # columns of past (the batch's common width)
        self.input_names = spec.past_names()
        self.output_names = spec.present_names()

    def binding(self, session: ort.InferenceSession, *, device: str, device_id: int = 0) -> ort.IOBinding:
        """A new IO binding of `session` with the past bound as inputs and the presents (first) left
        for ORT to allocate on `device`."""
        binding = session.io_binding()
        for name in self.output_names:
            binding.bind_output(name, device, device_id=device_id)
        for name, value in zip(self.input_names, self._values, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        return binding

    def update(self, present: list[ort.OrtValue], new_tokens: int) -> None:
        """Take the step's present outputs (graph order) as the next past."""
        self._values = list(present)
        self.length += new_tokens

    def devices(self) -> set[str]:
        """Where the entries live: {'host'} after a reshape, {'cpu'} or {'cuda'} when the last step's outputs."""
        return {"host" if isinstance(v, np.ndarray) else v.device_name().lower() for v in self._values}

    def arrays(self) -> list[np.ndarray]:
        """Every entry as a host array: [(batch, kv_heads, past, head_dim)] in graph order (copies from a device)."""
        return [_to_numpy(v) for v in self._values]

    def rewind_to(self, length: int) -> None:
        """Forget every column after the first `length` (copies, to host)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of length {self.length} to {length}")
        self._set([resize(a, length, axis=2, align=Align.LEFT) for a in self.arrays()], length)

    def select(self, rows: Sequence[int], *, first_column: int = 0) -> None:
        """Keep only `rows` (in that order) and the columns from `first_column` on (copies, to host)."""
        width = self.length - first_column
        self._set([gather([(a, rows)], axis=2, width=width, align=Align.RIGHT) for a in self.arrays()], width)
        self.batch = len(rows)

    def append_rows(self, other: KVCache) -> None:
        """Add `other`'s rows after this cache's, both right-aligned to the wider past (copies, to host)."""
        self._set([append_rows(a, b, axis=2, align=Align.RIGHT) for a, b in zip(self.arrays(), other.arrays(),
                                                                                  strict=True)],
                  max(self.length, other.length))
        self.batch += other.batch

    def load(self, arrays: list[np.ndarray], length: int) -> None:
        """Hold `arrays` ([(batch, kv_heads, length, head_dim)] in graph order) as the past."""
        self._set(arrays, length)

    def _set(self, arrays: list[np.ndarray], length: int) -> None:
        self._values = [np.ascontiguousarray(a) for a in arrays]
        self.length = length


def _to_numpy(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()
