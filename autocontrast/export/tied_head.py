"""Store a tied head once: `MatMul(x, Wᵀ)` with Wᵀ a folded copy of the embedding -> `Gemm(x, W, transB=1)`.

Tracing `x @ W.t()` for a head tied to the token embedding, constant folding stores Wᵀ as a
second initializer beside W (SmolLM2: 113 MB more, in every graph's memory). ONNX `Gemm` reads
B transposed, so the head can use the embedding matrix itself; Gemm is 2-D, so x is flattened
to (rows, hidden) and the product reshaped back to x's leading dims.

>>> untie_transposed_copies(model_proto)  # doctest: +SKIP
1
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from autocontrast.export.weights import read_block

BLOCK_ROWS = 4096  # rows of the embedding compared at a time
PROBE_ENTRIES = 16  # of the head's first row, compared before any block


def _is_transpose(head: onnx.TensorProto, embedding: onnx.TensorProto, base_dir: Path | None) -> bool:
    """head == embedding.T, compared a block of embedding rows at a time (neither is read whole).

    A few leading entries are compared first: most candidates (every square projection of a layer is one
    for each other) differ there, and a full comparison reads every row of both with a read each.
    """
    rows = embedding.dims[0]
    probe = min(PROBE_ENTRIES, rows)
    if not np.array_equal(read_block(head, base_dir, slice(0, 1), slice(0, probe)),
                          read_block(embedding, base_dir, slice(0, probe), slice(0, 1)).T):
        return False
    for i in range(0, rows, BLOCK_ROWS):
        block = slice(i, min(i + BLOCK_ROWS, rows))
        every = slice(None)
        if not np.array_equal(read_block(head, base_dir, every, block), read_block(embedding, base_dir, block, every).T):
            return False
    return True


def untie_transposed_copies(model: onnx.ModelProto, *, base_dir: Path | None = None) -> int:
    """Rewrite each MatMul whose B is the transpose of another initializer; returns how many.

    `base_dir`: where a lean graph's external weights are; they are compared through memory maps.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    big2d = {n: t for n, t in inits.items() if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 1 << 16}
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, t in big2d.items():
        by_shape.setdefault((t.dims[0], t.dims[1]), []).append(name)
    rewritten = 0
    nodes = list(graph.node)
    for node in nodes:
        if node.op_type != "MatMul" or node.input[1] not in big2d:
            continue
        wt = big2d[node.input[1]]
        hidden, vocab = wt.dims
        candidates = [n for n in by_shape.get((vocab, hidden), []) if n != node.input[1]]
        if not candidates:
            continue
        source = next((n for n in candidates if _is_transpose(wt, inits[n], base_dir)), None)
        if source is None:
            continue
        _replace_with_gemm(graph, node, source, hidden, vocab, tag=f"untied{rewritten}")
        rewritten += 1
    used = {i for n in graph.node for i in n.input}
    for name in [n for n in big2d if n not in used]:
        graph.initializer.remove(inits[name])
    return rewritten


def _replace_with_gemm(graph: onnx.GraphProto, node: onnx.NodeProto, weight: str, hidden: int, vocab: int, *,
                       tag: str) -> None:
    x, y = node.input[0], node.output[0]
    names = {k: f"{tag}/{k}" for k in ("shape", "lead", "flat", "prod", "out_shape", "rows_h", "vocab",
                                       "start", "end")}
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1, hidden], np.int64), names["rows_h"]),
        numpy_helper.from_array(np.array([vocab], np.int64), names["vocab"]),
        numpy_helper.from_array(np.array([0], np.int64), names["start"]),
        numpy_helper.from_array(np.array([-1], np.int64), names["end"]),
    ])
    new = [
        helper.make_node("Shape", [x], [names["shape"]]),
        helper.make_node("Slice", [names["shape"], names["start"], names["end"]], [names["lead"]]),
        helper.make_node("Reshape", [x, names["rows_h"]], [names["flat"]]),  # (rows, hidden)
        helper.make_node("Gemm", [names["flat"], weight], [names["prod"]], transB=1),  # (rows, vocab)
        helper.make_node("Concat", [names["lead"], names["vocab"]], [names["out_shape"]], axis=0),
        helper.make_node("Reshape", [names["prod"], names["out_shape"]], [y]),  # (..., vocab)
    ]
    position = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, n in enumerate(new):
        graph.node.insert(position + offset, n)
