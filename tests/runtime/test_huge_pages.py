"""A CPU session's own weights end up in 2 MiB pages (Linux with MADV_COLLAPSE); nothing else changes."""

from __future__ import annotations

import mmap
import re
import subprocess
import sys

import pytest

from autocontrast.runtime import huge_pages
from autocontrast.runtime.huge_pages import HUGE_PAGE, huge_pages_for_new_memory


def _private(size: int) -> mmap.mmap:
    """Private anonymous memory, as malloc maps it (mmap(-1) alone would be shared memory)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _collapse_works() -> bool:
    if not huge_pages.enabled():
        return False
    with huge_pages_for_new_memory() as pages:
        region = _private(4 * HUGE_PAGE)
        region.write(b"x" * len(region))
    region.close()
    return pages.collapsed_bytes > 0


needs_collapse = pytest.mark.skipif(not _collapse_works(), reason="needs Linux 6.1+ (MADV_COLLAPSE) and "
                                    "transparent huge pages not 'never'")


@needs_collapse
def test_memory_mapped_inside_the_block_is_collapsed_and_keeps_its_data():
    with huge_pages_for_new_memory() as pages:
        region = _private(8 * HUGE_PAGE)
        region.write(bytes(range(256)) * (len(region) // 256))
    assert pages.collapsed_bytes >= 6 * HUGE_PAGE  # at least the whole 2 MiB pages inside it
    assert region[:256] == bytes(range(256)) and region[-256:] == bytes(range(256))
    region.close()


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV_SWITCH, "0")
    with huge_pages_for_new_memory() as pages:
        region = _private(4 * HUGE_PAGE)
        region.write(b"x" * len(region))
    region.close()
    assert pages.collapsed_bytes == 0


@needs_collapse
def test_a_smollm2_cpu_session_has_its_weights_in_huge_pages(smollm2_bundle):
    # a fresh process, as a service opens its sessions: in one that freed much memory before (this
    # test process exported models), the allocator may reuse it and those pages stay small
    code = ("import sys; from autocontrast.bundle import read_manifest; "
            "from autocontrast.runtime.session import load_session; b = sys.argv[1]; "
            "g = read_manifest(b).graph('decode_exits'); "
            "print(load_session(b, g.file, threads=1).huge_page_bytes, "
            "load_session(b, g.file, threads=1, share_weights=True).huge_page_bytes)")
    out = subprocess.run([sys.executable, "-c", code, str(smollm2_bundle)], capture_output=True, text=True,
                         check=True).stdout.split()
    own, shared = int(out[0]), int(out[1])
    assert own >= 400 << 20  # SmolLM2's fp32 layer and head weights: 538 MB
    assert shared == 0  # shared weights are the file's memory map, not anonymous memory


def _resident_kib(start: int) -> int:
    """Rss of the mapping that begins at `start` (/proc/self/smaps)."""
    found = False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                found = int(line.split("-")[0], 16) == start
            elif found and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError("mapping not found")


@pytest.mark.skipif(not huge_pages.enabled(), reason="Linux only")
def test_paging_out_a_weight_file_frees_its_pages_and_keeps_every_byte(tmp_path):
    import numpy as np

    data = np.arange(4 << 20, dtype=np.int32)  # 16 MiB
    (tmp_path / "weights.bin").write_bytes(data.tobytes())
    mapped = np.memmap(tmp_path / "weights.bin", dtype=np.int32, mode="c")  # private, as ONNX Runtime maps it
    assert int(mapped.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page read: resident
    mapped[7] = -1  # one page written since it was mapped: it must keep the write
    start = mapped.ctypes.data  # offset 0: the array begins where the mapping does
    before = _resident_kib(start)
    assert before >= 8 * 1024
    assert huge_pages.page_out_files(str(tmp_path)) >= data.nbytes
    assert _resident_kib(start) < before // 4  # the untouched pages went back to the file
    assert mapped[7] == -1 and np.array_equal(mapped[8:], data[8:])  # read back from the file, the write kept
    assert huge_pages.page_out_files(str(tmp_path / "elsewhere")) == 0  # only files under the directory
