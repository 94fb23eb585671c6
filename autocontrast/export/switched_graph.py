"""One decode graph for the original head, an early exit and ACD: its parts run by switch inputs.

ONNX Runtime gives every session its own copy of the weights (on CPU, MLAS pre-packs each MatMul
weight into a buffer of the session's own, and the Python API has no shared pre-packed
container). A Generator serving the original head, exit K and ACD through three graphs therefore
held the weights three times. This pass turns the stacked-exits decode graph (exits U = the top
layer, whose head is the model's own, and K < U, plus the fused contrast) into one graph that
serves all three, so one session holds one copy:

- the layers 1..K (and everything both exits need) run always;
- `If(compute_upper)`: layers K+1..L and exit U's row; otherwise no row, and layers K+1..L's
  presents are their pasts (`Identity` of the same bound buffer: nothing is copied);
- `If(compute_lower)`: exit K's row (its norm at its last position); otherwise no row;
- the head multiplies whichever rows ran (one matrix product, as before), so `exit_logits` is
  (batch, rows, vocab): U and K, U alone, or K alone;
- `If(compute_upper and compute_lower)`: the fused contrast; otherwise an empty tensor.

A mode's step computes what its own graph computed (exit K: only layers 1..K), plus a few `If`
kernels. The manifest's `decode_original`, `decode_exits` and `decode_exit_K` entries name this
one file, each with the switch values it runs with (`GraphSpec.switches`); their KV cache is the
whole model's (`GraphSpec.cache_layers`).

The pass partitions nodes by what each output needs (backward closures), so it works on whatever
the fusions left, but it needs the exits' rows stacked by one `Concat` feeding the head through
Reshape/Gemm/MatMul/MatMulNBits/Cast (one projection group, a `SHARED_PROJECTION_*` bundle).

>>> merge_decode_graph(proto, stacked=(30, 15), lower_layers=15, kv=kv, hidden_size=576,
...                    contrast_output="contrast_scores")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from autocontrast.bundle import (
    DECODE_EXITS,
    DECODE_ORIGINAL,
    INPUT_IDS,
    LOGITS_OUTPUT,
    LOWER_SWITCH,
    SWITCHED_DECODE_FILE,
    UPPER_SWITCH,
    GraphSpec,
    KVCacheSpec,
    early_exit_graph,
)
from autocontrast.errors import ExportError
from autocontrast.export.fusions import _reads

CONTRAST_SWITCH = "compute_contrast"  # internal: And(upper, lower)
# ops the head applies to the stacked rows on its way to the logits (data input first)
HEAD_PATH_OPS = ("Reshape", "Gemm", "MatMul", "MatMulNBits", "Cast", "Mul")


def merge_decode_graph(model: onnx.ModelProto, *, stacked: Sequence[object], lower_layers: int, kv: KVCacheSpec,
                       hidden_size: int, contrast_output: str | None, logits_output: str = LOGITS_OUTPUT) -> None:
    """Rewrite the stacked-exits decode graph `model` (exits `stacked` = (upper, lower), in row order) in place."""
    graph = model.graph
    nodes = list(graph.node)
    producer = {name: i for i, n in enumerate(nodes) for name in n.output if name}
    stack = _stack_node(nodes, producer, logits_output)
    if stack is None or len(nodes[stack].input) != 2 or len(stacked) != 2:
        raise ExportError("cannot build one switched decode graph: the exits' rows are not stacked by one Concat "
                          "before a shared head; export with --decode-graphs separate")
    upper_row, lower_row = nodes[stack].input
    presents = kv.present_names()
    low_presents, up_presents = presents[:2 * lower_layers], presents[2 * lower_layers:]

    def closure(names: Iterable[str]) -> set[int]:
        return _closure(nodes, producer, names)

    lower_side = closure([lower_row]) | closure(low_presents)
    upper_side = closure([upper_row]) | closure(up_presents)
    base = (lower_side & upper_side) | closure(low_presents)
    upper_only, lower_only = upper_side - base, lower_side - base
    head = closure([logits_output]) - lower_side - upper_side
    contrast = closure([contrast_output]) - closure([logits_output]) if contrast_output else set()
    # nodes in none of these sets feed no output: they are dropped
    _check_reads(nodes, head | contrast, producer, upper_only | lower_only, allowed={upper_row, lower_row})

    types = {v.name: v.type for v in graph.output}
    rows = helper.make_tensor_type_proto(TensorProto.FLOAT, ["batch", "rows", hidden_size])  # float32 bundles only
    upper_if = _if_node(
        UPPER_SWITCH, "upper", [upper_row] + up_presents, [rows] + [types[p] for p in up_presents],
        then_nodes=[nodes[i] for i in sorted(upper_only)],
        else_nodes=_empty_rows("upper", hidden_size) + [helper.make_node("Identity", [past], [f"upper/kept/{past}"])
                                                        for past in _pasts(kv, up_presents)],
        else_outputs=["upper/empty_rows"] + [f"upper/kept/{past}" for past in _pasts(kv, up_presents)])
    lower_if = _if_node(
        LOWER_SWITCH, "lower", [lower_row], [rows], then_nodes=[nodes[i] for i in sorted(lower_only)],
        else_nodes=_empty_rows("lower", hidden_size), else_outputs=["lower/empty_rows"])
    new_nodes = [nodes[i] for i in base | head] + [upper_if, lower_if]
    if contrast_output:
        new_nodes.append(helper.make_node("And", [UPPER_SWITCH, LOWER_SWITCH], [CONTRAST_SWITCH], name="both_exits"))
        new_nodes.append(_if_node(
            CONTRAST_SWITCH, "contrast", [contrast_output], [types[contrast_output]],
            then_nodes=[nodes[i] for i in sorted(contrast)],
            else_nodes=[helper.make_node("Constant", [], ["contrast/none"],
                                         value=numpy_helper.from_array(np.zeros((0, 0), np.float32)))],
            else_outputs=["contrast/none"]))
    del graph.node[:]
    graph.node.extend(_topological(new_nodes))
    graph.input.extend(helper.make_tensor_value_info(name, TensorProto.BOOL, []) for name in (UPPER_SWITCH, LOWER_SWITCH))
    _relax_output_dims(graph, [logits_output] + ([contrast_output] if contrast_output else []))


def _stack_node(nodes: list[onnx.NodeProto], producer: dict[str, int], logits_output: str) -> int | None:
    """The Concat that stacks the exits' rows, found walking back from the logits along the head's data input."""
    name = logits_output
    for _ in range(16):
        index = producer.get(name)
        if index is None:
            return None
        node = nodes[index]
        if node.op_type == "Concat":
            return index
        if node.op_type not in HEAD_PATH_OPS:
            return None
        name = node.input[0]
    return None


def _closure(nodes: list[onnx.NodeProto], producer: dict[str, int], names: Iterable[str]) -> set[int]:
    """Indices of every node the values `names` depend on (subgraphs' outer reads included)."""
    seen: set[int] = set()
    todo = [n for n in names if n in producer]
    while todo:
        index = producer[todo.pop()]
        if index in seen:
            continue
        seen.add(index)
        todo.extend(n for n in _reads(nodes[index]) if n in producer)
    return seen


def _check_reads(nodes: list[onnx.NodeProto], readers: set[int], producer: dict[str, int], branch: set[int], *,
                 allowed: set[str]) -> None:
    """The head and the contrast may read, of what the branches make, only the rows."""
    for i in readers:
        for name in _reads(nodes[i]):
            if name not in allowed and producer.get(name) in branch:
                raise ExportError(f"cannot build one switched decode graph: {nodes[i].op_type} node {nodes[i].name!r} "
                                  f"reads {name!r}, which only one exit computes; export with --decode-graphs separate")


def _pasts(kv: KVCacheSpec, presents: list[str]) -> list[str]:
    """The past input each present is the same buffer as (the layout's names, layer by layer)."""
    pairs = dict(zip(kv.present_names(), kv.past_names(), strict=True))
    return [pairs[p] for p in presents]


def _empty_rows(scope: str, hidden_size: int) -> list[onnx.NodeProto]:
    """Nodes making `{scope}/empty_rows`, (batch, 0, hidden) float32: no row, but the batch size (from
    `input_ids`) and the width the other exit's rows have, so the head's Concat takes it."""
    rest = numpy_helper.from_array(np.array([0, hidden_size], np.int64))
    return [helper.make_node("Shape", [INPUT_IDS], [f"{scope}/batch"], end=1),
            helper.make_node("Constant", [], [f"{scope}/rest"], value=rest),
            helper.make_node("Concat", [f"{scope}/batch", f"{scope}/rest"], [f"{scope}/rows_shape"], axis=0),
            helper.make_node("ConstantOfShape", [f"{scope}/rows_shape"], [f"{scope}/empty_rows"],
                             value=numpy_helper.from_array(np.zeros(1, np.float32)))]


def _if_node(condition: str, scope: str, outputs: list[str], types: list[onnx.TypeProto], *,
             then_nodes: list[onnx.NodeProto], else_nodes: list[onnx.NodeProto],
             else_outputs: list[str]) -> onnx.NodeProto:
    """`If(condition)` with `outputs` (the names the rest of the graph reads) of `types`. Inside the
    then-branch, the nodes that made those values write scope-prefixed names instead (ONNX names are
    unique across scopes); the else-branch's nodes make `else_outputs`."""
    inner = {name: f"{scope}/{name}" for name in outputs}
    then_nodes = [_renamed(n, inner) for n in then_nodes]

    def branch(name: str, body: list[onnx.NodeProto], results: list[str]) -> onnx.GraphProto:
        return helper.make_graph(_topological(body), name, [], [helper.make_value_info(r, t)
                                                               for r, t in zip(results, types, strict=True)])

    return helper.make_node("If", [condition], outputs, name=f"{scope}_if",
                            then_branch=branch(f"{scope}_then", then_nodes, [inner[o] for o in outputs]),
                            else_branch=branch(f"{scope}_else", else_nodes, else_outputs))


def _renamed(node: onnx.NodeProto, names: dict[str, str]) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.output[:] = [names.get(o, o) for o in copy.output]
    copy.input[:] = [names.get(i, i) for i in copy.input]
    return copy


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`nodes` ordered so each follows what it reads among them (names from outside are available)."""
    made = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    order, placed, visiting = [], set(), set()

    def place(i: int) -> None:
        if i in placed:
            return
        stack = [(i, iter(sorted(_reads(nodes[i]))))]
        visiting.add(i)
        while stack:
            current, pending = stack[-1]
            for name in pending:
                j = made.get(name)
                if j is not None and j not in placed and j not in visiting:
                    visiting.add(j)
                    stack.append((j, iter(sorted(_reads(nodes[j])))))
                    break
            else:
                stack.pop()
                placed.add(current)
                order.append(nodes[current])

    for i in range(len(nodes)):
        place(i)
    return order


def _relax_output_dims(graph: onnx.GraphProto, names: list[str]) -> None:
    """The row count of the logits (and the contrast's shape) now depend on the switches."""
    for output in graph.output:
        if output.name in names:
            for i, dim in enumerate(output.type.tensor_type.shape.dim):
                dim.Clear()
                dim.dim_param = f"{output.name}_dim_{i}"


def switch_decode_graphs(bundle_dir: Path, specs: list[GraphSpec], *, lower: int, kv: KVCacheSpec,
                         hidden_size: int) -> list[GraphSpec]:
    """Turn the bundle's `decode_exits` graph into `SWITCHED_DECODE_FILE` and point `decode_original`,
    `decode_exits` and `decode_exit_{lower}` at it, each with its switches; returns the new specs."""
    stacked = next(s for s in specs if s.name == DECODE_EXITS)
    source = Path(bundle_dir) / stacked.file
    proto = onnx.load(str(source), load_external_data=False)  # the weights stay where they are in weights.bin
    merge_decode_graph(proto, stacked=stacked.exits, lower_layers=lower, kv=kv, hidden_size=hidden_size,
                       contrast_output=stacked.contrast.output if stacked.contrast else None,
                       logits_output=stacked.logits_output)
    onnx.save_model(proto, str(Path(bundle_dir) / SWITCHED_DECODE_FILE))
    source.unlink()
    switches = {DECODE_ORIGINAL: ((UPPER_SWITCH, True), (LOWER_SWITCH, False)),
                DECODE_EXITS: ((UPPER_SWITCH, True), (LOWER_SWITCH, True)),
                early_exit_graph(lower): ((UPPER_SWITCH, False), (LOWER_SWITCH, True))}
    return [dataclasses.replace(s, file=SWITCHED_DECODE_FILE, switches=switches[s.name]) if s.name in switches else s
            for s in specs]
