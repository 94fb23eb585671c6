"""Back the memory a new ONNX Runtime session allocates (its pre-packed weights) with 2 MiB pages.

A decode step reads every weight once: 540 MB for SmolLM2 in fp32, 135,000 pages of 4 KiB, so
the CPU's TLB misses on nearly every page. Most Linux systems hand anonymous memory huge pages only
where asked (`transparent_hugepage=madvise`), and ONNX Runtime does not ask. So the runtime does,
after a session is created: every anonymous mapping that appeared or grew meanwhile is marked
`MADV_HUGEPAGE` and collapsed at once with `MADV_COLLAPSE` (Linux 6.1+; elsewhere, or where the
kernel refuses, nothing happens). The data and the resident size stay the same (acd-bench's peak
RSS for SmolLM2 was the same with and without it; README "Huge pages"). Only memory mapped while the session
is created counts: in a process that freed much memory before, the allocator may reuse it, and
those pages stay small (open sessions early, as a service does).

`AUTOCONTRAST_HUGE_PAGES=0` turns it off.

>>> with huge_pages_for_new_memory() as pages:  # doctest: +SKIP
...     session = ort.InferenceSession(path)
>>> pages.collapsed_bytes  # doctest: +SKIP
547356672
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import sys
from collections.abc import Iterator

import numpy as np

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # <asm-generic/mman-common.h>
MADV_PAGEOUT = 21
MADV_COLLAPSE = 25
ENV_SWITCH = "AUTOCONTRAST_HUGE_PAGES"


@dataclasses.dataclass
class HugePages:
    """What `huge_pages_for_new_memory` did: bytes now in huge pages (0 where it could not)."""

    collapsed_bytes: int = 0


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get(ENV_SWITCH, "1") != "0"


def _mappings() -> Iterator[tuple[int, int, str, str]]:
    """(start, end, permissions, path or "") of each of this process's mappings (/proc/self/maps)."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.rstrip("\n").split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            yield start, end, fields[1], fields[5] if len(fields) == 6 else ""


def anonymous_regions() -> set[tuple[int, int]]:
    """(start, end) of this process's writable anonymous mappings (the heap included)."""
    return {(start, end) for start, end, permissions, path in _mappings()
            if path in ("", "[heap]") and permissions.startswith("rw")}


@functools.cache  # a KV buffer calls it at every reallocation
def _madvise() -> ctypes._CFuncPtr:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def _whole_pages(start: int, end: int) -> tuple[int, int]:
    """The 2 MiB-aligned part of [start, end)."""
    return -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE


def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """`np.empty`, its whole 2 MiB pages marked for huge pages before anything touches them (so the
    first write faults in huge pages, nothing is copied); where that is off or refused, plain memory."""
    return _advised(np.empty(shape, dtype))


def zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """`np.zeros` marked as `empty` is: a large one is fresh zero pages (calloc maps them, nothing is
    written), so only what is written later becomes resident."""
    return _advised(np.zeros(shape, dtype))


def _advised(array: np.ndarray) -> np.ndarray:
    if enabled() and array.nbytes >= 2 * HUGE_PAGE:
        first, last = _whole_pages(array.ctypes.data, array.ctypes.data + array.nbytes)
        _madvise()(first, last - first, MADV_HUGEPAGE)
    return array


def collapse(regions: set[tuple[int, int]]) -> int:
    """Mark the whole 2 MiB pages inside `regions` for huge pages and collapse them now; returns the
    bytes collapsed (a range the kernel refuses is left as it is)."""
    madvise = _madvise()
    done = 0
    for start, end in sorted(regions):
        first, last = _whole_pages(start, end)
        if last - first < HUGE_PAGE:
            continue
        madvise(first, last - first, MADV_HUGEPAGE)
        if madvise(first, last - first, MADV_COLLAPSE) == 0:
            done += last - first
    return done


def file_regions(directory: str) -> list[tuple[int, int]]:
    """(start, end) of this process's private (copy-on-write) mappings of files under `directory`."""
    root = os.path.join(os.path.realpath(directory), "")
    return [(start, end) for start, end, permissions, path in _mappings()
            if path.startswith(root) and permissions[3] == "p"]


def page_out_files(directory: str) -> int:
    """Hand back the pages of this process's private mappings of the files under `directory` (a bundle's
    weights; `MADV_PAGEOUT`, Linux 5.4+). ONNX Runtime keeps an initializer mapped when a kernel reads it
    unpacked: the tied embedding, which pre-packing for the head read whole (108 MiB resident for
    SmolLM2) but whose Gather reads one row per token. After this only the pages read again are
    resident, each read back from the file on first use. Never loses data: a page written since it
    was mapped is swapped out or kept, not dropped. Returns the bytes advised (0 where off)."""
    if not enabled():
        return 0
    madvise = _madvise()
    done = 0
    with contextlib.suppress(OSError):
        for start, end in file_regions(directory):
            if madvise(start, end - start, MADV_PAGEOUT) == 0:
                done += end - start
    return done


@contextlib.contextmanager
def huge_pages_for_new_memory(active: bool = True) -> Iterator[HugePages]:
    """Collapse into huge pages the anonymous memory the block mapped (see the module); `active`
    False: nothing (the caller's memory is not its own to move, e.g. a file's memory map)."""
    result = HugePages()
    if not (active and enabled()):
        yield result
        return
    before = anonymous_regions()
    yield result
    with contextlib.suppress(OSError):
        result.collapsed_bytes = collapse(anonymous_regions() - before)
