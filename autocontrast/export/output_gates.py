"""Switches that skip the fused outputs a step does not read, in a decode graph that fuses more than one.

ONNX Runtime runs every node of a graph at every run, whatever outputs the run asks for. A decode
graph that fuses both the ACD contrast and DoLa (`--fuse-contrast` with `--fuse-dola`) therefore
computed both at every step, and a batch decoding with ACD paid for DoLa's selection too (the demo's
SmolLM2-135M bundle: an ACD step 5 % cheaper at batch 1 and 10 % at batch 4 with DoLa switched off;
`benchmarks/output_switch_cost.py`). This pass moves the nodes that only one fused output needs into
`If(output_switch(output))`:

- the switch is a boolean scalar input (bundle format 6): the runtime feeds false for the fused
  outputs no row of the step reads (`ExitSession.step(fused=...)`), and that output is then an empty
  tensor, and true otherwise;
- the exit logits, the KV cache and whatever both outputs share (the head's rows) stay outside.

>>> gate_fused_outputs(proto, ["contrast_scores", "dola_scores"])  # doctest: +SKIP
['contrast_scores', 'dola_scores']
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from autocontrast.bundle import DECODE, GraphSpec, output_switch
from autocontrast.export.switched_graph import _closure, _if_node, _relax_output_dims, _topological


def gate_fused_outputs(model: onnx.ModelProto, outputs: Sequence[str]) -> list[str]:
    """Put each of `outputs`' own nodes behind its switch, in place; returns the outputs gated (an output
    that needs no node of its own, or that the graph does not return, is left as it is)."""
    graph = model.graph
    nodes = list(graph.node)
    producer = {name: i for i, n in enumerate(nodes) for name in n.output if name}
    returned = [o.name for o in graph.output]
    types = {o.name: o.type for o in graph.output}
    own = {}
    for output in outputs:
        if output in types:
            own[output] = _closure(nodes, producer, [output]) - _closure(nodes, producer, [o for o in returned if o != output])
    own = {output: indices for output, indices in own.items() if indices}
    inside = set().union(*own.values()) if own else set()
    kept = [nodes[i] for i in sorted(_closure(nodes, producer, returned) - inside)]
    for output, indices in own.items():
        switch = output_switch(output)
        loose = _loose(types[output])
        empty = np.zeros((0,) * len(loose.tensor_type.shape.dim), helper.tensor_dtype_to_np_dtype(loose.tensor_type.elem_type))
        kept.append(_if_node(switch, switch, [output], [loose], then_nodes=[nodes[i] for i in sorted(indices)],
                             else_nodes=[helper.make_node("Constant", [], [f"{switch}/none"],
                                                          value=numpy_helper.from_array(empty))],
                             else_outputs=[f"{switch}/none"]))
        graph.input.append(helper.make_tensor_value_info(switch, TensorProto.BOOL, []))
    del graph.node[:]
    graph.node.extend(_topological(kept))
    _relax_output_dims(graph, list(own))
    return list(own)


def _loose(value_type: onnx.TypeProto) -> onnx.TypeProto:
    """`value_type` with every dimension named, not fixed: an else-branch returns an empty tensor."""
    loose = copy.deepcopy(value_type)
    for i, dim in enumerate(loose.tensor_type.shape.dim):
        dim.Clear()
        dim.dim_param = f"gated_dim_{i}"
    return loose


def gate_bundle_graphs(bundle_dir: Path, specs: list[GraphSpec]) -> list[str]:
    """Gate the fused outputs of every decode graph of the bundle that fuses more than one; the files changed."""
    changed = []
    for spec in specs:
        fused = [s.output for s in (spec.contrast, spec.dola) if s is not None]
        if spec.kind != DECODE or len(fused) < 2 or spec.switches:
            continue
        path = Path(bundle_dir) / spec.file
        proto = onnx.load(str(path), load_external_data=False)  # the weights stay where they are in weights.bin
        if gate_fused_outputs(proto, fused):
            onnx.save_model(proto, str(path))
            changed.append(spec.file)
    return changed
