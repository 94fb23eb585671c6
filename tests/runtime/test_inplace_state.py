"""The in-place KV buffer (GroupQueryAttention graphs): ragged rows, joins, leaves, rewinds and
capacity growth, each step compared with the PyTorch model run on the row's whole sequence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from autocontrast.bundle import BUFFER_LAYOUT, CONCAT_LAYOUT, read_manifest
from autocontrast.config import VocabularyProjectionMode
from autocontrast.runtime.decode_state import DecodeState, open_decode_state
from autocontrast.runtime.inplace_state import InPlaceDecodeState
from autocontrast.runtime.kv_buffer import CAPACITY_STEP
from autocontrast.runtime.session import open_session
from tests.tiny_models import multi_exit_model

MODE = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """(PyTorch model, exits) of the tiny Llama checkpoint behind `llama_bundle`."""
    return multi_exit_model(tiny_checkpoint("llama", MODE), MODE)


@pytest.fixture()
def state(llama_bundle):
    manifest = read_manifest(llama_bundle)
    return open_decode_state(open_session(llama_bundle, manifest, manifest.graph("decode_exits")))


def torch_logits(model, exits, tokens: list[int]) -> np.ndarray:
    """(n_exits, vocab): every exit's logits after `tokens`, from the whole sequence, no cache."""
    from autocontrast.export.validation import torch_step

    ids = np.array([tokens], np.int64)
    by_exit, _ = torch_step(model, exits, ids, np.ones_like(ids), np.arange(len(tokens))[None], None)
    return np.stack([by_exit[e][0].numpy() for e in exits])


def check(model, state, out, sequences: list[list[int]]) -> None:
    exits = state.session.graph.exits
    for row, tokens in enumerate(sequences):
        np.testing.assert_allclose(out.exit_logits[row], torch_logits(model, exits, tokens), atol=TOLERANCE,
                                   err_msg=f"row {row} after {len(tokens)} tokens")


def test_llama_bundles_use_the_buffer_layout_and_other_families_the_concatenated_cache(llama_bundle, tiny_bundle):
    assert read_manifest(llama_bundle).kv_cache.layout == BUFFER_LAYOUT
    gpt2 = read_manifest(tiny_bundle("gpt2", MODE.name))
    assert gpt2.kv_cache.layout == CONCAT_LAYOUT
    manifest = read_manifest(llama_bundle)
    assert isinstance(open_decode_state(open_session(llama_bundle, manifest, manifest.graph("decode_exits"))),
                      InPlaceDecodeState)
    assert isinstance(open_decode_state(open_session(tiny_bundle("gpt2", MODE.name), gpt2, gpt2.graph("decode_exits"))),
                      DecodeState)


def test_ragged_rows_join_leave_and_rewind_match_pytorch(reference, state):
    rng = np.random.default_rng(7)
    seqs = [list(rng.integers(3, 2000, n)) for n in (9, 4, 6)]
    check(reference, state, state.extend(seqs[:2]), seqs[:2])  # two rows of different lengths
    for _ in range(3):  # every row steps at its own position
        nxt = rng.integers(3, 2000, 2)
        seqs[0].append(int(nxt[0]))
        seqs[1].append(int(nxt[1]))
        check(reference, state, state.advance(nxt), seqs[:2])
    check(reference, state, state.extend([seqs[2]]), [seqs[2]])  # a row joins mid-way
    state.rewind_row(0, 5)  # row 0 forgets its last tokens: bookkeeping only
    seqs[0] = seqs[0][:5]
    nxt = rng.integers(3, 2000, 3)
    for row in range(3):
        seqs[row].append(int(nxt[row]))
    check(reference, state, state.advance(nxt), seqs)
    state.keep([2, 0])  # row 1 leaves, the others swap places
    seqs = [seqs[2], seqs[0]]
    nxt = rng.integers(3, 2000, 2)
    for row in range(2):
        seqs[row].append(int(nxt[row]))
    check(reference, state, state.advance(nxt), seqs)


def test_steps_and_rewinds_write_in_place(state):
    state.extend([[5, 6, 7], [8, 9]])
    buffers = [v.data_ptr() for v in state.cache._values]
    binding = state.cache.binding(state.session.session, device="cpu")
    state.advance(np.array([10, 11]))
    state.rewind_row(1, 1)
    state.advance(np.array([12, 13]))
    assert [v.data_ptr() for v in state.cache._values] == buffers  # no copy of the cache, no reallocation
    assert state.cache.binding(state.session.session, device="cpu") is binding  # the buffers were bound once
    assert state.lengths().tolist() == [5, 2]


def test_the_buffer_grows_past_its_capacity_and_stays_exact(reference, state):
    rng = np.random.default_rng(3)
    seqs = [list(rng.integers(3, 2000, CAPACITY_STEP - 2)), list(rng.integers(3, 2000, 5))]
    state.extend(seqs)
    capacity, binding = state.cache.capacity, state.cache.binding(state.session.session, device="cpu")
    for _ in range(3):  # crosses the first capacity
        nxt = rng.integers(3, 2000, 2)
        for row in range(2):
            seqs[row].append(int(nxt[row]))
        out = state.advance(nxt)
    assert state.cache.capacity > capacity
    assert state.cache.binding(state.session.session, device="cpu") is not binding  # the new buffers are bound
    check(reference, state, out, seqs)


def test_rewinding_beyond_the_row_is_refused(state):
    state.extend([[5, 6, 7]])
    with pytest.raises(ValueError, match="cannot rewind a row of 3 cached tokens to 4"):
        state.rewind_row(0, 4)


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_a_float32_buffer_graph_is_refused_on_the_gpu_with_what_to_do(llama_bundle, provider):
    from autocontrast.errors import BundleError
    from autocontrast.runtime.session import check_attention_kernels

    manifest = read_manifest(llama_bundle)
    graph = manifest.graph("decode_exits")
    for refused in (graph, manifest.graph("decode_exits_mixed")):  # the mixed-step graph attends the same way
        with pytest.raises(BundleError, match="--dtype float16 for the GPU, or with --kv-layout concat"):
            check_attention_kernels(refused, manifest.kv_cache, provider)
    check_attention_kernels(graph, manifest.kv_cache, "cpu")  # float32 GroupQueryAttention runs on CPUs
    check_attention_kernels(graph, dataclasses.replace(manifest.kv_cache, dtype="float16"), provider)
