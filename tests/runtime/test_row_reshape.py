"""The row reshape helpers against the same reshapes built by hand, value by value: rows taken in any order,
the sequence axis padded or trimmed at the edge away from the alignment, other batches' rows appended, each
result a copy."""

from __future__ import annotations

import numpy as np
import pytest

from autocontrast.runtime.row_reshape import Align, append_rows, gather, pad_ragged, resize, unused_columns


def _kv(batch: int, columns: int, seed: int) -> np.ndarray:
    """(batch, kv_heads=2, columns, head_dim=3) of distinct values."""
    return np.random.default_rng(seed).standard_normal((batch, 2, columns, 3)).astype(np.float32)


def _by_hand(sources, width: int, align: Align) -> np.ndarray:
    """The reference: each taken row placed column by column into zeros, in a (batch, heads, width, dim) array."""
    rows = [(array, r) for array, taken in sources for r in (range(len(array)) if taken is None else taken)]
    out = np.zeros((len(rows), 2, width, 3), dtype=np.float32)
    for i, (array, r) in enumerate(rows):
        have = array.shape[2]
        for column in range(width):
            source = column if align is Align.LEFT else have - width + column
            if 0 <= source < have:
                out[i, :, column, :] = array[r, :, source, :]
    return out


@pytest.mark.parametrize("align", list(Align))
@pytest.mark.parametrize("width", [0, 2, 5, 8])
def test_gather_takes_rows_in_order_and_resizes_at_the_edge_away_from_the_alignment(align, width):
    first, second = _kv(3, 5, seed=1), _kv(2, 3, seed=2)
    sources = [(first, [2, 0, 2]), (second, None)]
    np.testing.assert_array_equal(gather(sources, axis=2, width=width, align=align),
                                  _by_hand(sources, width, align))


def test_gather_writes_into_out_and_leaves_the_rest_of_it_alone():
    array = _kv(2, 4, seed=3)
    out = np.full((2, 2, 6, 3), 7.0, dtype=np.float32)
    assert gather([(array, [1, 0])], axis=2, width=6, align=Align.LEFT, out=out) is out
    np.testing.assert_array_equal(out[:, :, :4], array[[1, 0]])
    assert (out[:, :, 4:] == 7.0).all()  # beyond the copied columns: untouched (a buffer's zero pages stay unwritten)


def test_gather_refuses_an_out_of_the_wrong_shape():
    with pytest.raises(ValueError, match="needs"):
        gather([(_kv(2, 4, seed=3), None)], axis=2, width=5, align=Align.LEFT, out=np.zeros((2, 2, 4, 3)))


def test_every_result_is_a_copy_never_a_view_of_a_source():
    array = _kv(2, 4, seed=4)
    results = [gather([(array, None)], axis=2, width=4, align=Align.RIGHT), resize(array, 3, axis=2, align=Align.LEFT),
               append_rows(array, array, axis=2, align=Align.RIGHT)]
    assert not any(np.shares_memory(r, array) for r in results)


def test_resize_trims_or_pads_each_row_at_the_end_when_aligned_left_and_at_the_start_when_right():
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 0]])  # (batch, columns)
    np.testing.assert_array_equal(resize(mask, 3, axis=1, align=Align.LEFT), mask[:, :3])
    np.testing.assert_array_equal(resize(mask, 2, axis=1, align=Align.RIGHT), mask[:, 2:])
    np.testing.assert_array_equal(resize(mask, 6, axis=1, align=Align.RIGHT), np.pad(mask, ((0, 0), (2, 0))))
    np.testing.assert_array_equal(resize(mask, 6, axis=1, align=Align.LEFT), np.pad(mask, ((0, 0), (0, 2))))


@pytest.mark.parametrize("align", list(Align))
def test_append_rows_pads_both_batches_to_the_wider_then_stacks_them(align):
    narrow, wide = _kv(2, 3, seed=5), _kv(1, 6, seed=6)
    pad = (3, 0) if align is Align.RIGHT else (0, 3)
    want = np.concatenate([np.pad(narrow, ((0, 0), (0, 0), pad, (0, 0))), wide])
    np.testing.assert_array_equal(append_rows(narrow, wide, axis=2, align=align), want)


def test_append_rows_keeps_the_common_dtype():
    assert append_rows(np.zeros((1, 2), np.float16), np.zeros((1, 3), np.float32), axis=1,
                       align=Align.RIGHT).dtype == np.float32


@pytest.mark.parametrize("align, ids, mask", [
    (Align.RIGHT, [[4, 5, 6], [9, 7, 8]], [[1, 1, 1], [0, 1, 1]]),
    (Align.LEFT, [[4, 5, 6], [7, 8, 9]], [[1, 1, 1], [1, 1, 0]]),
])
def test_pad_ragged_lines_token_lists_up_by_their_alignment(align, ids, mask):
    got_ids, got_mask = pad_ragged([[4, 5, 6], [7, 8]], pad=9, align=align)
    assert got_ids.tolist() == ids and got_mask.tolist() == mask
    assert got_ids.dtype == got_mask.dtype == np.int64


def test_unused_columns_counts_the_leading_and_trailing_columns_no_row_uses():
    assert unused_columns(np.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]])) == (1, 1)
    assert unused_columns(np.array([[1, 1], [0, 1]])) == (0, 0)
    assert unused_columns(np.zeros((2, 3), np.int64)) == (3, 3)  # none used: every column is both
    assert unused_columns(np.zeros((0, 3), np.int64)) == (3, 3)  # no rows
