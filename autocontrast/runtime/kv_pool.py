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
A request takes the first pages of the smallest free piece that holds it (the rest stays free), and pieces
coming back are joined with their free neighbours. The pool keeps at most
`max_idle_bytes` of wholly idle blocks (`AUTOCONTRAST_KV_POOL_MB`, default `DEFAULT_IDLE_MB`; 0 hands each
back at once), besides what `reserve` set aside (a server's `--kv-reserve-mb`, touched at start-up).

>>> block = default_pool().take((60, 4, 3, 256, 64), np.dtype(np.float32))  # doctest: +SKIP
>>> del block  # its memory waits in the pool for the next buffer that fits
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
import weakref

import numpy as np

from autocontrast.errors import RuntimeOptionError
from autocontrast.runtime import huge_pages

ENV_IDLE_MB = "AUTOCONTRAST_KV_POOL_MB"
DEFAULT_IDLE_MB = 1024
PAGE = 4096


class _Lease:
    """What NumPy sees a lent piece through (`__array_interface__`): every array over the piece keeps this
    object alive, and the pool takes the piece back when it goes."""

    def __init__(self, raw: np.ndarray, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.__array_interface__ = {"shape": shape, "typestr": dtype.str, "data": (raw.ctypes.data + offset, False),
                                    "version": 3}


@dataclasses.dataclass(eq=False)  # pieces are told apart by identity (their arrays do not compare)
class _Piece:
    """Free bytes [offset, offset + size) of one block (`raw`) of the pool."""

    raw: np.ndarray
    offset: int
    size: int

    @property
    def whole(self) -> bool:
        return self.offset == 0 and self.size == self.raw.nbytes


class KVPool:
    """Idle host memory, lent as arrays of any shape that fits; thread-safe (pieces come back from whichever
    thread drops the last array over them).

    Each dtype has its own free list of pieces (a block lent whole, or cut from a larger one and joined
    again with its free neighbours when it comes back). `reserve` adds a block touched now, at start-up,
    so that the first buffers of a server never wait on fresh pages.
    """

    def __init__(self, max_idle_bytes: int) -> None:
        if max_idle_bytes < 0:
            raise RuntimeOptionError(f"a KV pool's idle bytes must be >= 0, got {max_idle_bytes}")
        self.max_idle_bytes = max_idle_bytes
        self._free: dict[np.dtype, list[_Piece]] = {}  # per dtype, in the order they became free
        self._reserved: set[int] = set()  # id() of reserved blocks: kept whatever the idle bound
        self._lock = threading.Lock()
        self.reused = 0  # arrays lent from pooled memory
        self.fresh = 0  # arrays over memory the system gave

    @property
    def idle_bytes(self) -> int:
        """Free bytes held, reserved blocks included."""
        with self._lock:
            return sum(p.size for pieces in self._free.values() for p in pieces)

    def reserve(self, nbytes: int, dtype: np.dtype) -> float:
        """Add a block of `nbytes` for buffers of `dtype`, every page of it touched now (so no step pays for it
        later); kept whatever the idle bound. Returns the seconds the touching took."""
        start = time.perf_counter()
        raw = huge_pages.zeros((_aligned(max(nbytes, 1)),), np.dtype(np.uint8))
        raw[::PAGE] = 0  # one write a page: the system maps it now
        with self._lock:
            self._reserved.add(id(raw))
            self._free.setdefault(np.dtype(dtype), []).append(_Piece(raw, 0, raw.nbytes))
        return time.perf_counter() - start

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An array of `shape` and `dtype` over free memory of that dtype that fits (its old values: zeros or
        what a buffer of that dtype wrote), or over fresh zeroed memory (in huge pages where the system allows)."""
        dtype = np.dtype(dtype)
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        lent = self._cut(need, dtype)
        if lent is None:
            raw = huge_pages.zeros((_aligned(max(need, 1)),), np.dtype(np.uint8))
            lent = (raw, 0, raw.nbytes)
            self.fresh += 1
        else:
            self.reused += 1
        raw, offset, size = lent
        lease = _Lease(raw, offset, tuple(int(d) for d in shape), dtype)
        weakref.finalize(lease, self._put, dtype, _Piece(raw, offset, size))  # holds the block meanwhile
        return np.asarray(lease)

    def _cut(self, need: int, dtype: np.dtype) -> tuple[np.ndarray, int, int] | None:
        """(block, offset, size) lent for `need` bytes: the first whole pages of the smallest free piece that holds
        them (the rest stays free)."""
        with self._lock:
            pieces = self._free.get(dtype, [])
            fits = [p for p in pieces if p.size >= need]
            if not fits:
                return None
            piece = min(fits, key=lambda p: p.size)
            size = _aligned(max(need, 1))
            if piece.size - size < PAGE:
                pieces.remove(piece)
                return piece.raw, piece.offset, piece.size
            piece.offset, piece.size = piece.offset + size, piece.size - size
            return piece.raw, piece.offset - size, size

    def _put(self, dtype: np.dtype, back: _Piece) -> None:
        """A piece nothing reads any more: joined with its free neighbours of the same block; blocks wholly free
        past the idle bound go back to the system, oldest first (reserved ones never)."""
        with self._lock:
            pieces = self._free.setdefault(dtype, [])
            for piece in [p for p in pieces if p.raw is back.raw]:
                if piece.offset + piece.size == back.offset or back.offset + back.size == piece.offset:
                    pieces.remove(piece)
                    back = _Piece(back.raw, min(piece.offset, back.offset), piece.size + back.size)
            pieces.append(back)
            unreserved = [p for p in pieces if p.whole and id(p.raw) not in self._reserved]
            idle = sum(p.size for p in unreserved)
            for piece in unreserved:  # oldest first
                if idle <= self.max_idle_bytes:
                    break
                pieces.remove(piece)
                idle -= piece.size

    def clear(self) -> None:
        """Hand every idle block back to the system (reserved ones too)."""
        with self._lock:
            self._free.clear()
            self._reserved.clear()


def _aligned(nbytes: int) -> int:
    """`nbytes` rounded up to whole pages (pieces cut from one block start on a page)."""
    return -(-nbytes // PAGE) * PAGE


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
