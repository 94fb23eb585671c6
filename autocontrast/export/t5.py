"""Encoder-decoder (T5) exports: the encoder graph, tracing of the decoder graphs, the manifest part.

`acd-export` builds a T5 bundle with the same stages as a decoder-only one (see exporter.py); what
differs lives here: an `encoder` graph in front of the plan (prompt -> every decoder layer's
cross-attention keys and values, computed once), decoder graphs that take those as inputs (see
t5_graph.py), their validation against the Hugging Face model (t5_validation.py), and the
manifest's `EncoderDecoderSpec`. Exits are decoder layers, as in the original library.

>>> from autocontrast.export import ExportOptions, export_bundle
>>> export_bundle("tiny-t5-checkpoint", "t5-bundle", options=ExportOptions(exits=(4, 2),
...               fuse_contrast=(4, 2)))  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from autocontrast.bundle import (
    ATTENTION_MASK,
    CONTRAST_OUTPUT,
    DECODE,
    ENCODER,
    INPUT_IDS,
    LOGITS_OUTPUT,
    TOKEN_INPUTS,
    EncoderDecoderSpec,
    KVCacheSpec,
)
from autocontrast.config import Exit
from autocontrast.errors import ExportError
from autocontrast.export.plan import PlannedGraph
from autocontrast.export.weights import WeightStore

ENCODER_GRAPH = "encoder"
ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK)
DECODER_INPUTS = TOKEN_INPUTS


def check_options(options: Any) -> None:
    """Refuse the variants not built for encoder-decoder bundles yet (each needs its own validation)."""
    unsupported = [flag for flag, asked in (("--optimize", options.optimize), ("--quantize", options.quantize),
                                            ("--tensorrt", options.tensorrt)) if asked]
    if unsupported:
        raise ExportError(f"{', '.join(unsupported)} is not supported for encoder-decoder (T5) models yet; "
                          "export without it (float32 or --dtype float16)")


def with_encoder(plan: list[PlannedGraph]) -> list[PlannedGraph]:
    """The exporter's graph plan with the encoder graph first."""
    return [PlannedGraph(ENCODER_GRAPH, ENCODER, ())] + plan


def encoder_decoder_spec(model: Any) -> EncoderDecoderSpec:
    config = model.config
    start = config.decoder_start_token_id
    if start is None:
        raise ExportError("this T5 checkpoint's config.json has no decoder_start_token_id; set it (T5 uses the "
                          "pad token, 0) and export again")
    return EncoderDecoderSpec(decoder_start_token_id=int(start), num_layers=model.num_layers,
                              encoder_layers=int(config.num_layers), encoder_graph=ENCODER_GRAPH)


def trace_t5_graph(model: Any, exits: tuple[Exit, ...], *, kind: str, contrast: tuple[Exit, Exit, float, int] | None,
                   kv: KVCacheSpec, target: Path, store: WeightStore, opset: int = 17) -> Path:
    """Export one graph of a T5 bundle to `target` (beside `store`, its weights written there); returns `target`."""
    from autocontrast.export.lean_trace import export_lean
    from autocontrast.export.patcher import export_patches
    from autocontrast.export.t5_graph import T5DecoderGraph, T5EncoderGraph

    spec = encoder_decoder_spec(model)
    cross = spec.cross_names()
    batch, seq, past, source = 2, 3, 4, 5
    vocab = model.config.vocab_size
    source_mask = torch.ones(batch, source, dtype=torch.int64)
    if kind == ENCODER:
        graph: torch.nn.Module = T5EncoderGraph(model)
        args: tuple = (torch.randint(0, vocab, (batch, source)), source_mask)
        inputs, outputs = list(ENCODER_INPUTS), cross
        dynamic = {"input_ids": {0: "batch", 1: "source_length"}, "attention_mask": {0: "batch", 1: "source_length"},
                   **{n: {0: "batch", 2: "source_length"} for n in cross}}
    else:
        graph = T5DecoderGraph(model, exits, kind=kind, contrast=contrast)
        decode = kind == DECODE
        total = past + seq if decode else seq
        positions = torch.arange(total - seq, total).expand(batch, seq).contiguous()
        dtype = next(model.parameters()).dtype
        cross_kv = [torch.zeros(batch, kv.num_kv_heads, source, kv.head_dim, dtype=dtype) for _ in cross]
        past_kv = [torch.zeros(batch, kv.num_kv_heads, past, kv.head_dim, dtype=dtype)
                   for _ in kv.past_names()] if decode else []
        args = (torch.randint(0, vocab, (batch, seq)), torch.ones(batch, total, dtype=torch.int64), positions,
                source_mask, *cross_kv, *past_kv)
        inputs = list(DECODER_INPUTS) + [spec.encoder_attention_mask] + cross + (kv.past_names() if decode else [])
        outputs = [LOGITS_OUTPUT] + ([CONTRAST_OUTPUT] if contrast else []) + (kv.present_names() if decode else [])
        per_token = {0: "batch"} if decode else {0: "batch", 1: "sequence"}
        dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
                   "attention_mask": {0: "batch", 1: "total_length" if decode else "sequence"},
                   spec.encoder_attention_mask: {0: "batch", 1: "source_length"},
                   LOGITS_OUTPUT: per_token, CONTRAST_OUTPUT: per_token,
                   **{n: {0: "batch", 2: "source_length"} for n in cross},
                   **{n: {0: "batch", 2: "past_length"} for n in kv.past_names()},
                   **{n: {0: "batch", 2: "total_length"} for n in kv.present_names()}}
    dynamic = {k: v for k, v in dynamic.items() if k in set(inputs) | set(outputs)}
    with export_patches(model):
        return export_lean(graph, args, target, store, input_names=inputs, output_names=outputs,
                           dynamic_axes=dynamic, opset_version=opset)
