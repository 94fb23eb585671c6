"""The KV cache of one generation call: what each decode step feeds back as its past.

The exported graphs concatenate past and new keys/values inside the graph (an attention without a
shared past/present buffer), so the cache here holds ONNX Runtime's own present outputs and binds
them as the next step's past with IO binding: no copy to NumPy and back, no per-step host
allocation, and on CUDA the cache never leaves the device. Only a rewind copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from autocontrast.bundle import KVCacheSpec


class KVCache:
    """Past keys/values of every layer, in graph input order: key then value of layer 0, 1, ...

    Each entry is (batch, kv_heads, past, head_dim), a NumPy array (empty past, after a rewind) or
    an `OrtValue` produced by the previous step (on the session's device).
    """

    def __init__(self, spec: KVCacheSpec, batch: int) -> None:
        self.spec = spec
        self.batch = batch
        empty = np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), dtype=np.dtype(spec.dtype))
        self._values: list[Any] = [empty] * (2 * spec.num_layers)
        self.length = 0

    @property
    def input_names(self) -> list[str]:
        return self.spec.past_names()

    @property
    def output_names(self) -> list[str]:
        return self.spec.present_names()

    def bind_inputs(self, binding: ort.IOBinding) -> None:
        for name, value in zip(self.input_names, self._values, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)

    def update(self, present: list[ort.OrtValue], new_tokens: int) -> None:
        """Take the step's present outputs (graph order) as the next past."""
        self._values = list(present)
        self.length += new_tokens

    def rewind_to(self, length: int) -> None:
        """Forget everything after the first `length` positions (copies, to host)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of length {self.length} to {length}")
        self._values = [np.ascontiguousarray(_to_numpy(v)[:, :, :length, :]) for v in self._values]
        self.length = length


def _to_numpy(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()
