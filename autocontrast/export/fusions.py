"""Graph fusions, named, so a family can say which ones its graphs get (`Family.fusions`).

Each fusion is a pass over an ONNX model that returns how many fused nodes it made; the exporter
records those counts in the manifest (`variant["fusions"]`). They work on whatever the traced
graph contains (a pattern that is not there fuses nothing), so they apply to eager or fused
attention alike.

- `shared_input_matmuls` (ours): MatMuls that read the same activation with constant weights of
  the same input width (Llama's q/k/v projections; gate/up) become one MatMul over the
  concatenated weights and a Split. Each output column is the same dot product as before, so the
  result is unchanged; a step reads the activation once and runs one kernel instead of 3 (or 2),
  and a quantized MatMulNBits graph gets 151 nodes instead of 211 for SmolLM2, as onnxruntime-genai
  ships it. Weight-only block quantization runs along K, per output column, so fusing before
  quantizing quantizes every weight exactly as before.
- `static_reshapes` (ours): the traced graph computes every Reshape's target shape at run time
  (`Shape -> Gather -> Unsqueeze -> Concat`, ~20 small kernels per layer of a Llama decode graph,
  which ONNX Runtime cannot fold: batch and sequence are dynamic). Symbolic shape inference names
  every dimension; a Reshape of a Reshape reads the first one's input, a Reshape to the shape it
  already has goes, and any other whose target is known becomes a constant (`0` keeps a dimension,
  `-1` infers at most one); the shape arithmetic left unread is removed. Data are not touched.
- `packed_qkv` (ours, after the two above): a `GroupQueryAttention` that reads the three parts of
  one Split (the merged q/k/v MatMul) reads the MatMul's output whole, as the op's packed-QKV
  form, and the Split goes.
- `skip_simplified_layer_norm`, `simplified_layer_norm`, `rotary_embedding`: ONNX Runtime's own
  fusion classes (`onnxruntime.transformers`), run one by one on our graph.
- `gpt2_optimizer`: ONNX Runtime's whole GPT-2 optimizer (LayerNorm, Gelu, skip-LayerNorm, GPT-2
  attention), for the GPT-2 family it was written for.

>>> counts = apply_fusions(work / "decode_exits.onnx", ("shared_input_matmuls",), model=model,
...                        store=store)  # doctest: +SKIP
>>> counts
{'shared_input_matmuls': 60}
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from autocontrast.errors import ExportError
from autocontrast.export.weights import WeightStore, is_external, load_lean, save_lean


def fuse_shared_input_matmuls(model: onnx.ModelProto, *, vocab_size: int | None = None,
                              base_dir: Path | None = None, store: WeightStore | None = None) -> int:
    """Merge MatMuls that share their input and have constant 2-D weights of one K; returns the merges.

    `base_dir`: where external weights are (a lean graph's folder); each group's weights are read
    from there only while it is merged, and its merged matrix goes straight into `store` where given
    (else it stays in the proto).

    A weight read by any other node is left alone (merging would copy it), and so is a projection
    to the vocabulary (`vocab_size` columns): exits' heads are stacked differently by each graph of
    a bundle, so a merged head would be stored beside the unmerged one in the shared weights file.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    groups: dict[tuple[str, int, int], list[onnx.NodeProto]] = {}  # (input, K, dtype) -> MatMuls
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or readers[node.input[1]] != 1 or weight.dims[1] == vocab_size:
            continue
        groups.setdefault((node.input[0], weight.dims[0], weight.data_type), []).append(node)
    merged = 0
    for members in (m for m in groups.values() if len(m) > 1):
        # named after the first member, so passes that read module paths (attention_bits) still see them
        _merge(graph, members, [inits[n.input[1]] for n in members],
               tag=f"{members[0].name}/merged{len(members)}", base_dir=base_dir, store=store)
        merged += 1
    return merged


def _merge(graph: onnx.GraphProto, members: list[onnx.NodeProto], weights: list[onnx.TensorProto], *,
           tag: str, base_dir: Path | None, store: WeightStore | None) -> None:
    """Replace `members` by one MatMul over their concatenated weights (written to `store` where given:
    bytes set on a graph's proto stay in its arena until the whole graph is freed) and a Split."""
    arrays = [numpy_helper.to_array(w, base_dir=str(base_dir or "")) for w in weights]  # (K, N_i) each
    merged = np.concatenate(arrays, axis=1)  # (K, sum N_i)
    name = f"{tag}/weight"
    combined = numpy_helper.from_array(merged, name) if store is None else store.external(merged, name)
    sizes = numpy_helper.from_array(np.array([a.shape[1] for a in arrays], np.int64), f"{tag}/sizes")
    del arrays, merged
    product = f"{tag}/output"
    new = [helper.make_node("MatMul", [members[0].input[0], combined.name], [product], name=f"{tag}/MatMul"),
           helper.make_node("Split", [product, sizes.name], [n.output[0] for n in members], axis=-1,
                            name=f"{tag}/Split")]
    position = min(list(graph.node).index(n) for n in members)  # every reader of an output comes later
    for node in members:
        graph.node.remove(node)
    for offset, node in enumerate(new):
        graph.node.insert(position + offset, node)
    for w in weights:
        graph.initializer.remove(w)
    graph.initializer.extend([combined, sizes])


def simplify_reshapes(model: onnx.ModelProto) -> int:
    """Reshapes whose target shape symbolic shape inference resolves lose their run-time shape
    arithmetic (see the module's `static_reshapes`); returns how many Reshapes changed or went."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    graph = model.graph
    # auto_merge off: no dimension is assumed equal to another to make inference go through
    inferred = SymbolicShapeInference.infer_shapes(_weights_as_inputs(model), auto_merge=False,
                                                   guess_output_rank=False)
    shapes = {v.name: _dims(v) for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    producer = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}  # a removed Reshape's output -> the tensor that replaces it
    constants: dict[tuple[int, ...], str] = {}
    changed = 0
    for node in list(graph.node):
        if node.op_type != "Reshape" or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        node.input[0] = renamed.get(node.input[0], node.input[0])
        inner = producer.get(node.input[0])
        if inner is not None and inner.op_type == "Reshape":  # only the last target shape matters
            node.input[0], changed = inner.input[0], changed + 1
        source, target = shapes.get(node.input[0]), shapes.get(node.output[0])
        if source is None or target is None or any(d is None for d in source + target):
            continue
        if source == target and node.output[0] not in graph_outputs:
            renamed[node.output[0]] = node.input[0]
            graph.node.remove(node)
            changed += 1
            continue
        static = _static_shape(source, target)
        if static is not None:
            if static not in constants:
                constants[static] = f"static_reshapes/shape_{len(constants)}"
                graph.initializer.append(numpy_helper.from_array(np.array(static, np.int64), constants[static]))
            node.input[1], changed = constants[static], changed + 1
    _rename_inputs(graph, renamed)
    _prune(graph)
    return changed


def _weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a lean graph whose on-disk weights are typed inputs: shape inference sees their shapes
    without reading them (it reads any initializer's values it can, a norm's weight included)."""
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    external = [t for t in shell.graph.initializer if is_external(t)]
    for tensor in external:
        shell.graph.initializer.remove(tensor)
    shell.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
    return shell


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    kind = value.type.tensor_type
    if not kind.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in kind.shape.dim]


def _static_shape(source: list[int | str], target: list[int | str]) -> tuple[int, ...] | None:
    """Reshape's constant target for `target` from `source`: a named dimension kept in place is `0`,
    a number is itself, and one other named dimension is `-1`; None if that cannot say it."""
    static: list[int] = []
    for i, dim in enumerate(target):
        if isinstance(dim, int):
            if dim == 0:
                return None  # a 0 would mean "keep" here
            static.append(dim)
        elif i < len(source) and source[i] == dim:
            static.append(0)
        else:
            static.append(-1)
    return tuple(static) if static.count(-1) <= 1 else None


def pack_qkv(model: onnx.ModelProto) -> int:
    """`GroupQueryAttention` reading q, k, v as the three outputs of one last-axis Split reads the
    Split's input as packed QKV instead; returns how many nodes now do."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    packed = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) < 3:
            continue
        split = producer.get(node.input[0])
        if (split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3])
                or any(readers[name] != 1 for name in split.output)
                or not any(a.name == "axis" and a.i in (-1, 2) for a in split.attribute)):
            continue
        node.input[:3] = [split.input[0], "", ""]
        graph.node.remove(split)
        packed += 1
    _prune(graph)
    return packed


def _prune(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads (back to front), then initializers nothing reads."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(keep))
    unused = [t for t in graph.initializer if t.name not in needed]
    for t in unused:
        graph.initializer.remove(t)


def _reads(node: onnx.NodeProto) -> set[str]:
    """What a node reads: its inputs, and the outer names its subgraphs (an If's branches) read."""
    names = set(node.input)
    for attribute in node.attribute:
        for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
            for inner in sub.node:
                names |= _reads(inner)
    return names


def _rename_inputs(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    """Every reader of a renamed tensor, subgraphs included, reads its replacement."""
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
                _rename_inputs(sub, renamed)


# loggers ORT's transformer tools name without their package
ORT_TOOL_LOGGERS = ("fusion_base", "fusion_skiplayernorm", "fusion_utils", "onnx_model")


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """ONNX Runtime's Python tools log INFO lines per node or pass: WARNING and above only, for the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """The process's working directory is `path` for the block (contextlib.chdir, before Python 3.11)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def remove_same_type_casts(wrapped: Any) -> int:
    """ORT's `OnnxModel.remove_useless_cast_nodes` (a Cast to the type its input already has goes, its readers
    read the input), with the readers found through one index of the graph instead of a walk over every
    node per Cast (quadratic: 10 s of a 135M export's 4,000-node score graph). Returns the Casts removed.

    A Cast that yields a graph output stays unless its input has no other reader and is no graph input; then
    the input's producer writes the output's name (as ORT does).
    """
    inferred = wrapped.infer_runtime_shape(update=True)
    useless = [n for n in wrapped.nodes() if n.op_type == "Cast" and
               (dtype := wrapped.get_dtype(n.input[0], inferred)) and dtype == wrapped.get_dtype(n.output[0], inferred)]
    if not useless:
        return 0
    graph_inputs, graph_outputs = set(wrapped.get_graphs_input_names()), set(wrapped.get_graphs_output_names())
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}  # value -> (node, input slot) reading it
    for node in wrapped.nodes():
        for slot, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, slot))
    removed = []
    for cast in useless:
        source, target = cast.input[0], cast.output[0]
        others = [r for r in readers.get(source, []) if r[0] is not cast]
        if target in graph_outputs:
            if source in graph_inputs or others:
                continue
            wrapped.replace_output_of_all_nodes(source, target)
        else:
            moved = readers.pop(target, [])
            for node, slot in moved:
                node.input[slot] = source
            readers[source] = others + moved
        removed.append(cast)
    wrapped.remove_nodes(removed)
    return len(removed)


def _ort_fusion(class_name: str, op_type: str) -> Callable[[onnx.ModelProto, Any, Path], int]:
    """One of ONNX Runtime's fusion classes as a pass: run it, count the `op_type` nodes it added."""

    def run(proto: onnx.ModelProto, model: Any, base_dir: Path, store: WeightStore | None = None) -> int:
        from onnxruntime.transformers import fusion_rotary_attention, fusion_simplified_layernorm
        from onnxruntime.transformers.fusion_utils import FusionUtils
        from onnxruntime.transformers.onnx_model import OnnxModel

        module = fusion_rotary_attention if class_name == "FusionRotaryEmbeddings" else fusion_simplified_layernorm
        before = sum(n.op_type == op_type for n in proto.graph.node)
        # ORT's tools run ONNX shape inference, which checks external weights by a path relative to the
        # working directory: run them where the lean graph's weights file is
        with quiet_loggers("onnxruntime.transformers", *ORT_TOOL_LOGGERS), working_directory(base_dir):
            wrapped = OnnxModel(proto)
            # as ORT's own optimizers do first: the patterns do not see through Identity or a float32 ->
            # float32 Cast (the RMSNorm's upcast in a float32 graph)
            FusionUtils(wrapped).remove_identity_nodes()
            remove_same_type_casts(wrapped)
            getattr(module, class_name)(wrapped).apply()
            wrapped.prune_graph()
        return sum(n.op_type == op_type for n in proto.graph.node) - before

    return run


def _gpt2_optimizer(proto: onnx.ModelProto, model: Any, base_dir: Path, store: WeightStore | None = None) -> int:
    """ORT's GPT-2 optimizer reads the weights it fuses (attention's q/k/v): they are loaded for it."""
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.optimizer import optimize_by_fusion

    load_external_data_for_model(proto, str(base_dir))

    family = model.family
    optimized = optimize_by_fusion(proto, model_type="gpt2", num_heads=model.config.num_attention_heads,
                                   hidden_size=family.hidden_size(model.config))
    fused = sum(optimized.get_fused_operator_statistics().values())
    proto.CopyFrom(optimized.model)
    return fused


FUSIONS: dict[str, Callable[..., int]] = {  # (graph, model, weights folder[, store for what a fusion makes])
    "shared_input_matmuls": lambda proto, model, base_dir, store=None: fuse_shared_input_matmuls(
        proto, vocab_size=model.config.vocab_size, base_dir=base_dir, store=store),
    "static_reshapes": lambda proto, model, base_dir, store=None: simplify_reshapes(proto),
    "packed_qkv": lambda proto, model, base_dir, store=None: pack_qkv(proto),
    "simplified_layer_norm": _ort_fusion("FusionSimplifiedLayerNormalization", "SimplifiedLayerNormalization"),
    "skip_simplified_layer_norm": _ort_fusion("FusionSkipSimplifiedLayerNormalization",
                                              "SkipSimplifiedLayerNormalization"),
    "rotary_embedding": _ort_fusion("FusionRotaryEmbeddings", "RotaryEmbedding"),
    "gpt2_optimizer": _gpt2_optimizer,
}


def apply_fusions(path: Path, names: Sequence[str], *, model: Any, store: WeightStore) -> dict[str, int]:
    """Run the named fusions in order on the lean graph at `path` (beside `store`), rewrite it in place;
    returns {name: fused nodes}. Weights stay on disk; the tensors a fusion makes go into the store."""
    unknown = [n for n in names if n not in FUSIONS]
    if unknown:
        raise ExportError(f"unknown graph fusion(s) {unknown}; known: {', '.join(FUSIONS)}")
    proto = load_lean(path)
    counts = {}
    for name in names:
        counts[name] = FUSIONS[name](proto, model, store.directory, store)
        store.externalize(proto)  # what it made goes to disk now: the next pass copies a lean graph
    save_lean(proto, path, store)
    return counts


def describe_counts(counts: dict[str, int]) -> str:
    """{fusion: nodes made} as one line: `shared_input_matmuls 60, static_reshapes 302`."""
    return ", ".join(f"{name} {made}" for name, made in counts.items())
