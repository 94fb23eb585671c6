"""`KVPool`: host memory for KV buffers, recycled within the process instead of handed back to the system.

A `KVBuffer` gets a new block whenever its batch changes shape (rows join or leave, a row needs more
columns), and a chunked prompt gets a block of its own; GroupQueryAttention touches a buffer's whole
capacity on its first run. Memory fresh from the kernel costs a page fault per 4 KiB page when first
touched: ~0.3 us on bare metal, but ~12 us on a VM whose host backs guest memory lazily and takes free
pages back (this project's 2-core build VM: a 94 MB buffer, one SmolLM2 prompt of 2,048 columns, stalled
its first step by ~300 ms, and every stream decoding beside it). Memory this process touched before costs
nothing. So a block goes back to the pool when the last array over it goes (the buffer reshaped, a
prompt's state spent, a prefix-cache entry evicted), and the next block that fits takes it: a server in
steady state reuses the memory it already has, as vLLM's and llama.cpp's preallocated caches do.

A block taken holds zeros or values a KV buffer of the same dtype wrote there (blocks are pooled by dtype:
never bytes of another type read as floats, which could be NaN): the kernels read no column past a row's
length, or weigh it by exactly 0, which a finite value survives.
The pool keeps at most `max_idle_bytes` of idle blocks (`AUTOCONTRAST_KV_POOL_MB`, default
`DEFAULT_IDLE_MB`; 0 hands every block back at once) and never lends a block more than twice the size
asked for.

>>> block = default_pool().take((60, 4, 3, 256, 64), np.dtype(np.float32))  # doctest: +SKIP
>>> del block  # its memory waits in the pool for the next buffer that fits
"""

from __future__ import annotations

import functools
import os
import threading
import weakref

import numpy as np

from autocontrast.errors import RuntimeOptionError
from autocontrast.runtime import huge_pages

ENV_IDLE_MB = "AUTOCONTRAST_KV_POOL_MB"
DEFAULT_IDLE_MB = 1024
MAX_OVERSIZE = 2  # a block lent for a request is at most this many times its size


class _Lease:
    """What NumPy sees a lent block through (`__array_interface__`): every array over the block keeps this
    object alive, and the pool takes the block back when it goes."""

    def __init__(self, raw: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.__array_interface__ = {"shape": shape, "typestr": dtype.str, "data": (raw.ctypes.data, False),
                                    "version": 3}


class KVPool:
    """Idle host blocks, lent as arrays of any shape that fits; thread-safe (blocks come back from whichever
    thread drops the last array over them)."""

    def __init__(self, max_idle_bytes: int) -> None:
        if max_idle_bytes < 0:
            raise RuntimeOptionError(f"a KV pool's idle bytes must be >= 0, got {max_idle_bytes}")
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[tuple[np.dtype, np.ndarray]] = []  # (the dtype it held, raw uint8 block), oldest first
        self._lock = threading.Lock()
        self.reused = 0  # blocks lent from the pool
        self.fresh = 0  # blocks the system gave

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(raw.nbytes for _, raw in self._idle)

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An array of `shape` and `dtype` over an idle block of that dtype that fits (its old values), or over
        fresh zeroed memory (in huge pages where the system allows)."""
        dtype = np.dtype(dtype)
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = self._pop(need, dtype)
        if raw is None:
            raw = huge_pages.zeros((max(need, 1),), np.dtype(np.uint8))
            self.fresh += 1
        else:
            self.reused += 1
        lease = _Lease(raw, tuple(int(d) for d in shape), dtype)
        weakref.finalize(lease, self._put, dtype, raw)  # holds the block until the last array over it goes
        return np.asarray(lease)

    def _pop(self, need: int, dtype: np.dtype) -> np.ndarray | None:
        """The smallest idle block of `dtype` with `need` bytes or more (at most MAX_OVERSIZE times), out of the pool."""
        with self._lock:
            fits = [i for i, (held, raw) in enumerate(self._idle)
                    if held == dtype and need <= raw.nbytes <= MAX_OVERSIZE * max(need, 1)]
            if not fits:
                return None
            return self._idle.pop(min(fits, key=lambda i: self._idle[i][1].nbytes))[1]

    def _put(self, dtype: np.dtype, raw: np.ndarray) -> None:
        """A block nothing reads any more: kept for the next `take`, the oldest idle ones let go past the bound."""
        if raw.nbytes > self.max_idle_bytes:
            return
        with self._lock:
            self._idle.append((dtype, raw))
            total = sum(r.nbytes for _, r in self._idle)
            while total > self.max_idle_bytes:
                total -= self._idle.pop(0)[1].nbytes

    def clear(self) -> None:
        """Hand every idle block back to the system."""
        with self._lock:
            self._idle.clear()


def idle_bytes_from_env() -> int:
    """`AUTOCONTRAST_KV_POOL_MB` in bytes (default DEFAULT_IDLE_MB); a value that is not a whole number >= 0 is an
    error naming the variable."""
    value = os.environ.get(ENV_IDLE_MB, str(DEFAULT_IDLE_MB)).strip()
    if not value.isdigit():
        raise RuntimeOptionError(f"{ENV_IDLE_MB} must be a whole number of MB >= 0 (0: no pool), got {value!r}")
    return int(value) << 20


@functools.cache
def default_pool() -> KVPool:
    """The process's pool, which every `KVBuffer` on the host draws from."""
    return KVPool(idle_bytes_from_env())
