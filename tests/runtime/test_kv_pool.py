"""The KV pool: blocks come back when nothing reads them and are lent again (same memory), never across
dtypes, cut from larger pieces and joined again, within the idle bound; a decode state over blocks
holding old values still matches PyTorch."""

from __future__ import annotations

import gc

import numpy as np
import onnxruntime as ort
import pytest

from autocontrast.bundle import read_manifest
from autocontrast.errors import RuntimeOptionError
from autocontrast.runtime import kv_buffer, kv_pool
from autocontrast.runtime.decode_state import open_decode_state
from autocontrast.runtime.kv_pool import ENV_IDLE_MB, KVPool, idle_bytes_from_env
from autocontrast.runtime.session import open_session
from tests.runtime.test_inplace_state import MODE, check  # noqa: F401  (MODE: the tiny checkpoint's mode)

F32 = np.dtype(np.float32)
MB = 1 << 20


def test_a_block_comes_back_when_its_last_reader_goes_and_is_lent_again():
    pool = KVPool(64 * MB)
    block = pool.take((4, 1024, 64), F32)
    address = block.ctypes.data
    view = block[2]  # a prefix cache keeps views like this one
    value = ort.OrtValue.ortvalue_from_numpy(block[1])  # and a session's binding these
    del block
    gc.collect()
    assert pool.idle_bytes == 0  # still read through the view and the OrtValue
    del view, value
    gc.collect()
    assert pool.idle_bytes == 4 * 1024 * 64 * 4
    again = pool.take((2, 1024, 64), F32)  # smaller, within twice: the same memory
    assert again.ctypes.data == address and (pool.fresh, pool.reused) == (1, 1)


def test_blocks_are_not_lent_across_dtypes_and_a_larger_one_is_cut():
    pool = KVPool(64 * MB)
    block = pool.take((1024, 1024), F32)  # 4 MiB
    address = block.ctypes.data
    del block
    gc.collect()
    other = pool.take((1024, 1024), np.dtype(np.float16))
    assert other.dtype == np.float16 and pool.reused == 0  # another dtype: fresh
    small = pool.take((16, 16), F32)  # 1 KiB of the 4 MiB piece: its first page, the rest stays free
    assert small.ctypes.data == address and pool.reused == 1 and pool.idle_bytes == 4 * MB - 4096
    half = pool.take((512, 1024), F32)  # 2 MiB cut from the rest, right after the first page
    assert half.ctypes.data == address + 4096 and pool.idle_bytes == 2 * MB - 4096


def test_pieces_coming_back_join_their_free_neighbours():
    pool = KVPool(0)
    pool.reserve(4 * MB, F32)
    pieces = [pool.take((MB // 4,), F32) for _ in range(4)]  # the reserve, cut in four
    assert pool.idle_bytes == 0 and pool.fresh == 0
    start = pieces[0].ctypes.data
    del pieces[2], pieces[0]  # two pieces, not neighbours
    gc.collect()
    assert pool.idle_bytes == 2 * MB
    fresh = pool.take((MB // 2,), F32)  # no 2 MiB run free yet: fresh memory
    assert pool.fresh == 1 and not start <= fresh.ctypes.data < start + 4 * MB
    del fresh, pieces
    gc.collect()
    assert pool.idle_bytes == 4 * MB  # reserved: kept whatever the bound (0 here)
    assert pool.take((MB,), F32).ctypes.data == start  # joined again: the whole block, where it was


def test_a_reserve_is_touched_when_made():
    pool = KVPool(0)
    seconds = pool.reserve(8 * MB, F32)
    assert seconds >= 0 and pool.idle_bytes == 8 * MB


def test_idle_memory_stays_within_the_bound():
    pool = KVPool(3 * MB)
    blocks = [pool.take((MB // 4,), F32) for _ in range(5)]  # 1 MiB each
    del blocks
    gc.collect()
    assert pool.idle_bytes == 3 * MB
    off = KVPool(0)
    off.take((MB // 4,), F32)
    gc.collect()
    assert off.idle_bytes == 0


def test_the_idle_bound_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_IDLE_MB, "7")
    assert idle_bytes_from_env() == 7 * MB
    for bad in ("-1", "lots", "1.5"):
        monkeypatch.setenv(ENV_IDLE_MB, bad)
        with pytest.raises(RuntimeOptionError, match=ENV_IDLE_MB):
            idle_bytes_from_env()


class _StalePool(KVPool):
    """Every block it lends holds large finite values, as a block a finished batch left behind does."""

    def take(self, shape, dtype):
        block = super().take(shape, dtype)
        block.fill(1e3)
        return block


def test_ragged_rows_over_blocks_holding_old_values_match_pytorch(monkeypatch, llama_bundle, tiny_checkpoint):
    from tests.tiny_models import multi_exit_model

    monkeypatch.setattr(kv_buffer, "default_pool", lambda: _StalePool(64 * MB))
    model = multi_exit_model(tiny_checkpoint("llama", MODE), MODE)
    manifest = read_manifest(llama_bundle)
    state = open_decode_state(open_session(llama_bundle, manifest, manifest.graph("decode_exits")))
    rng = np.random.default_rng(11)
    seqs = [list(rng.integers(3, 2000, n)) for n in (7, 3)]
    check(model, state, state.extend(seqs), seqs)  # rows of different lengths: the shorter's columns hold 1e3
    check(model, state, state.extend([[5, 9]]), [[5, 9]])  # joins: a new block, copied into
    seqs.append([5, 9])
    state.keep([2, 0])  # a leave: another block
    seqs = [seqs[2], seqs[0]]
    for _ in range(2):
        nxt = rng.integers(3, 2000, 2)
        for row in range(2):
            seqs[row].append(int(nxt[row]))
        out = state.advance(nxt)
    check(model, state, out, seqs)


def test_the_process_pool_is_one_object():
    assert kv_pool.default_pool() is kv_pool.default_pool()


def test_a_server_reserve_is_capped_at_what_the_bundle_can_hold(llama_bundle, tiny_bundle):
    from autocontrast.runtime import Generator
    from autocontrast.serve.app import reserve_kv_memory

    generator = Generator(llama_bundle, preload=())
    kv, positions = generator.manifest.kv_cache, generator.manifest.max_positions
    most = 3 * positions * 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * np.dtype(kv.dtype).itemsize
    pool = KVPool(0)
    assert reserve_kv_memory(generator, 1 << 30, max_batch=2, pool=pool) == most  # 2 rows and a joining prompt
    assert pool.idle_bytes >= most
    assert reserve_kv_memory(generator, 4096, max_batch=2, pool=KVPool(0)) == 4096
    gpt2 = Generator(tiny_bundle("gpt2", MODE.name), preload=())  # a concatenated cache: no buffers to cut
    assert reserve_kv_memory(gpt2, 1 << 20, max_batch=2, pool=KVPool(0)) == 0
