"""Reshaping a batch's rows: the one home of taking rows, trimming or padding them along the sequence axis
and appending the rows of another batch, for every per-row array a decode state keeps (KV caches and
buffers, attention masks, an encoder's cross-attention KV).

Each array holds one row per index of axis 0 and a sequence (columns) along `axis` (>= 1). Resizing to
`width` columns keeps one edge in place, the `Align`: `LEFT` keeps column 0 where it is and pads (zeros)
or trims at the end; `RIGHT` keeps the last column last and pads or trims at the start. Rows whose
entries end at the last column (a concatenated KV cache, a left-padded prompt batch) join and leave
aligned right; rows written from column 0 (a KV buffer written in place) aligned left.

`gather` does all of it in one pass: the result is new (never a view of a source), each value copied
once, into `out` when given (a KV buffer's fresh zero pages) or into a new zeroed array.

>>> mask = np.array([[1, 1, 1], [0, 1, 1]])  # (batch, columns): right-aligned rows of 3 and 2 tokens
>>> gather([(mask, [1])], axis=1, width=2, align=Align.RIGHT)  # row 1 alone, its unused column dropped
array([[1, 1]])
>>> gather([(mask, None), (np.ones((1, 4), int), None)], axis=1, width=4, align=Align.RIGHT)
array([[0, 1, 1, 1],
       [0, 0, 1, 1],
       [1, 1, 1, 1]])
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np


class Align(enum.Enum):
    """The edge of the sequence axis that stays in place when rows are resized."""

    LEFT = "left"  # column j stays column j: padding or trimming at the end
    RIGHT = "right"  # the last column stays last: padding or trimming at the start


Source = tuple[np.ndarray, Sequence[int] | np.ndarray | None]  # an array and its rows to take (None: all, in order)


def gather(sources: Sequence[Source], *, axis: int, width: int, align: Align,
           out: np.ndarray | None = None) -> np.ndarray:
    """The chosen rows of each source in turn, every one resized to `width` columns along `axis`, keeping
    its `align` edge: (sum of rows taken, ..., width, ...). Written into `out` when given (its other
    values are left as they are; it must have that shape), else into a new zeroed array of the sources'
    common dtype."""
    first = sources[0][0]
    if width < 0 or not 1 <= axis < first.ndim:
        raise ValueError(f"width ({width}) must be >= 0 and axis ({axis}) within 1..{first.ndim - 1}")
    picked = [(array, None if rows is None else np.asarray(rows, dtype=np.int64)) for array, rows in sources]
    batch = sum(array.shape[0] if rows is None else len(rows) for array, rows in picked)
    shape = (batch,) + first.shape[1:axis] + (width,) + first.shape[axis + 1:]
    if out is None:
        out = np.zeros(shape, dtype=np.result_type(*(array for array, _ in picked)))
    elif out.shape != shape:
        raise ValueError(f"out has shape {out.shape}; gathering these rows needs {shape}")
    at = 0
    for array, rows in picked:
        columns = min(array.shape[axis], width)
        source = _columns(array.ndim, axis, _span(array.shape[axis], columns, align))
        target = _columns(array.ndim, axis, _span(width, columns, align))
        if rows is None:  # every row, in order: one slice assignment
            out[(slice(at, at + array.shape[0]),) + target[1:]] = array[source]
            at += array.shape[0]
            continue
        for row in rows:  # one row at a time: each value copied once, no temporary of the taken rows
            out[(at,) + target[1:]] = array[(int(row),) + source[1:]]
            at += 1
    return out


def resize(array: np.ndarray, width: int, *, axis: int, align: Align) -> np.ndarray:
    """Every row of `array` resized to `width` columns along `axis`, keeping its `align` edge (a new array)."""
    return gather([(array, None)], axis=axis, width=width, align=align)


def append_rows(first: np.ndarray, second: np.ndarray, *, axis: int, align: Align) -> np.ndarray:
    """`first`'s rows then `second`'s, both padded to the wider of the two along `axis` at the edge away from
    `align` (a new array)."""
    width = max(first.shape[axis], second.shape[axis])
    return gather([(first, None), (second, None)], axis=axis, width=width, align=align)


def pad_ragged(rows: Sequence[Sequence[int]], *, pad: int, align: Align) -> tuple[np.ndarray, np.ndarray]:
    """Token lists of different lengths as one batch: (ids, mask), each (len(rows), longest) int64, the mask
    1 where a row has a token; `align` is the edge the tokens line up by (RIGHT: left-padded)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)  # (batch, width)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        span = _span(width, len(row), align)
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


def unused_columns(mask: np.ndarray) -> tuple[int, int]:
    """(leading, trailing): how many of a (batch, columns) mask's first and last columns no row uses (every
    column counts as both when no row uses any)."""
    used = np.flatnonzero(mask.any(axis=0))
    if not used.size:
        return mask.shape[1], mask.shape[1]
    return int(used[0]), mask.shape[1] - 1 - int(used[-1])


def _span(width: int, columns: int, align: Align) -> slice:
    """The `columns` of `width` on the `align` edge."""
    return slice(0, columns) if align is Align.LEFT else slice(width - columns, width)


def _columns(ndim: int, axis: int, span: slice) -> tuple[slice, ...]:
    """An index of every row and every other axis, `span` along `axis`."""
    index = [slice(None)] * ndim
    index[axis] = span
    return tuple(index)
