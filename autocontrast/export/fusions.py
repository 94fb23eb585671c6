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
- `skip_simplified_layer_norm`, `simplified_layer_norm`, `rotary_embedding`: ONNX Runtime's own
  fusion classes (`onnxruntime.transformers`), run one by one on our graph.
- `gpt2_optimizer`: ONNX Runtime's whole GPT-2 optimizer (LayerNorm, Gelu, skip-LayerNorm, GPT-2
  attention), for the GPT-2 family it was written for.

>>> counts = apply_fusions(Path("raw/decode_exits/model.onnx"), ("shared_input_matmuls",), model=model,
...                        target=Path("raw/decode_exits/fused.onnx"))  # doctest: +SKIP
>>> counts
{'shared_input_matmuls': 60}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from autocontrast.errors import ExportError


def fuse_shared_input_matmuls(model: onnx.ModelProto, *, vocab_size: int | None = None) -> int:
    """Merge MatMuls that share their input and have constant 2-D weights of one K; returns the merges.

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
        _merge(graph, members, [inits[n.input[1]] for n in members], tag=f"{members[0].name}/merged{len(members)}")
        merged += 1
    return merged


def _merge(graph: onnx.GraphProto, members: list[onnx.NodeProto], weights: list[onnx.TensorProto], *,
           tag: str) -> None:
    arrays = [numpy_helper.to_array(w) for w in weights]  # (K, N_i) each
    combined = numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{tag}/weight")  # (K, sum N_i)
    sizes = numpy_helper.from_array(np.array([a.shape[1] for a in arrays], np.int64), f"{tag}/sizes")
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


def _ort_fusion(class_name: str, op_type: str) -> Callable[[onnx.ModelProto, Any], int]:
    """One of ONNX Runtime's fusion classes as a pass: run it, count the `op_type` nodes it added."""

    def run(proto: onnx.ModelProto, model: Any) -> int:
        from onnxruntime.transformers import fusion_rotary_attention, fusion_simplified_layernorm
        from onnxruntime.transformers.fusion_utils import FusionUtils
        from onnxruntime.transformers.onnx_model import OnnxModel

        module = fusion_rotary_attention if class_name == "FusionRotaryEmbeddings" else fusion_simplified_layernorm
        before = sum(n.op_type == op_type for n in proto.graph.node)
        wrapped = OnnxModel(proto)
        # as ORT's own optimizers do first: the patterns do not see through Identity or a float32 -> float32
        # Cast (the RMSNorm's upcast in a float32 graph)
        FusionUtils(wrapped).remove_identity_nodes()
        wrapped.remove_useless_cast_nodes()
        getattr(module, class_name)(wrapped).apply()
        wrapped.prune_graph()
        return sum(n.op_type == op_type for n in proto.graph.node) - before

    return run


def _gpt2_optimizer(proto: onnx.ModelProto, model: Any) -> int:
    from onnxruntime.transformers.optimizer import optimize_by_fusion

    family = model.family
    optimized = optimize_by_fusion(proto, model_type="gpt2", num_heads=model.config.num_attention_heads,
                                   hidden_size=family.hidden_size(model.config))
    fused = sum(optimized.get_fused_operator_statistics().values())
    proto.CopyFrom(optimized.model)
    return fused


FUSIONS: dict[str, Callable[[onnx.ModelProto, Any], int]] = {
    "shared_input_matmuls": lambda proto, model: fuse_shared_input_matmuls(proto, vocab_size=model.config.vocab_size),
    "simplified_layer_norm": _ort_fusion("FusionSimplifiedLayerNormalization", "SimplifiedLayerNormalization"),
    "skip_simplified_layer_norm": _ort_fusion("FusionSkipSimplifiedLayerNormalization",
                                              "SkipSimplifiedLayerNormalization"),
    "rotary_embedding": _ort_fusion("FusionRotaryEmbeddings", "RotaryEmbedding"),
    "gpt2_optimizer": _gpt2_optimizer,
}


def apply_fusions(path: Path, names: Sequence[str], *, model: Any, target: Path) -> dict[str, int]:
    """Run the named fusions in order on the graph at `path`, save it to `target`; returns {name: fused nodes}."""
    from autocontrast.export.weights import load_graph

    unknown = [n for n in names if n not in FUSIONS]
    if unknown:
        raise ExportError(f"unknown graph fusion(s) {unknown}; known: {', '.join(FUSIONS)}")
    proto = load_graph(path)
    counts = {name: FUSIONS[name](proto, model) for name in names}
    onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=target.name + ".data", size_threshold=1024)
    return counts
