"""Patches that make a transformers 4.5x model traceable by `torch.onnx.export`, undone on exit.

The traceable replacements are optimum-onnx's own (`optimum.exporters.onnx.model_patcher`): we
reuse its knowledge of what TorchScript cannot trace, but not its exporter driver (see
`autocontrast.export.exporter` for why). Each patch says why it is needed.

>>> with export_patches(model):  # doctest: +SKIP
...     torch.onnx.export(graph, args, path, dynamo=False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def export_patches(model: Any) -> Iterator[None]:
    """Apply every tracing patch for the duration of the block; restore everything after."""
    import transformers.masking_utils as masking
    from optimum.exporters.onnx import model_patcher as om
    from transformers.cache_utils import DynamicLayer

    undo: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    registry = masking.ALL_MASK_ATTENTION_FUNCTIONS
    saved_masks = {key: registry[key] for key in ("sdpa", "eager")}
    saved_attn = model.config._attn_implementation
    try:
        # Mask creation uses torch.vmap, which TorchScript cannot trace: a broadcasting version instead.
        registry.register("sdpa", om.sdpa_mask_without_vmap)
        registry.register("eager", om.eager_mask_without_vmap)
        # Packed-sequence detection reads position_ids with torch.diff and would freeze the example's
        # answer into the graph; our inputs are never packed sequences.
        patch(masking, "find_packed_sequence_indices", om.find_packed_sequence_indices_patched)
        # DynamicLayer.update concatenates onto an empty tensor on first use, which traces badly.
        patch(DynamicLayer, "update", om.patched_dynamic_layer_update)
        # Ops whose ONNX export fails or traces shapes as constants (tril/triu on ints, unfold, len, ...).
        for spec in om.UNSUPPORTED_OPS_PATCHING_SPEC:
            if spec.op_wrapper is None:
                patch(spec.o, spec.name, spec.custom_op)
        # Eager attention: plain MatMul/Softmax ops, an explicit mask (left padding), no SDPA shortcuts
        # that decide is_causal from the example inputs.
        model.config._attn_implementation = "eager"
        yield
    finally:
        for owner, name, value in reversed(undo):
            setattr(owner, name, value)
        for key, fn in saved_masks.items():
            registry.register(key, fn)
        model.config._attn_implementation = saved_attn
