"""Trace one graph of a bundle to ONNX with `torch.onnx.export` (TorchScript tracer).

Dynamic axes: batch, sequence, past and total length (a buffered cache: its capacity). The example
inputs have a non-empty past (tracing an empty one would specialise the concatenations); the graph
still takes an empty past for a prefill, which validation checks. A `BUFFER_LAYOUT` cache makes the
graph attend through GroupQueryAttention (`autocontrast.export.attention`).

>>> trace_graph(model, (30, 15), kind="decode", contrast=None, kv=kv, target=work / "decode.onnx", store=store)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from autocontrast.bundle import (
    ATTENTION_MASK,
    BUFFER_LAYOUT,
    CHUNK_TOKEN_INPUTS,
    CONTRAST_OUTPUT,
    DECODE,
    DOLA_OUTPUT,
    INPUT_IDS,
    LOGITS_OUTPUT,
    MIXED,
    POSITION_IDS,
    TOKEN_INPUTS,
    KVCacheSpec,
)
from autocontrast.config import Exit
from autocontrast.export.attention import CUSTOM_OPSETS
from autocontrast.export.graph import ExitGraph
from autocontrast.export.lean_trace import export_lean
from autocontrast.export.patcher import export_patches
from autocontrast.export.plan import FusedContrast, FusedDola
from autocontrast.export.weights import WeightStore


def trace_graph(model: Any, exits: tuple[Exit, ...], *, kind: str, contrast: FusedContrast | None,
                kv: KVCacheSpec, target: Path, store: WeightStore, opset: int = 17, layers: int | None = None,
                dola: FusedDola | None = None) -> Path:
    """Export one graph to `target` (beside `store`, its weights written there once); returns `target`.

    `kv` is the graph's own cache layout (an early-exit graph of `layers` layers caches that many).
    """
    if kind == MIXED:
        return _trace_mixed(model, exits, contrast=contrast, kv=kv, target=target, store=store, opset=opset, dola=dola)
    buffered = kind == DECODE and kv.layout == BUFFER_LAYOUT
    graph = ExitGraph(model, exits, kind=kind, contrast=contrast, dola=dola, layers=layers, buffered=buffered)
    batch, seq, past = 2, 3, 4
    capacity = past + seq + 1 if buffered else past  # a buffer holds the past and room for the new tokens
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    dtype = next(model.parameters()).dtype
    past_kv = [torch.zeros(batch, kv.num_kv_heads, capacity, kv.head_dim, dtype=dtype)  # (batch, kv_heads, past, head_dim)
               for _ in range(2 * kv.num_layers)] if kind == DECODE else []
    outputs = [LOGITS_OUTPUT] + ([CONTRAST_OUTPUT] if contrast else []) + ([DOLA_OUTPUT] if dola else [])
    dynamic = {INPUT_IDS: {0: "batch", 1: "sequence"}, ATTENTION_MASK: {0: "batch", 1: "total_length"},
               POSITION_IDS: {0: "batch", 1: "sequence"}, LOGITS_OUTPUT: {0: "batch"},
               CONTRAST_OUTPUT: {0: "batch"}, DOLA_OUTPUT: {0: "batch"}}
    if kind != DECODE:
        mask = torch.ones(batch, seq, dtype=torch.int64)
        positions = torch.arange(seq).expand(batch, seq).contiguous()
        dynamic[ATTENTION_MASK] = {0: "batch", 1: "sequence"}
        dynamic[LOGITS_OUTPUT] = dynamic[CONTRAST_OUTPUT] = dynamic[DOLA_OUTPUT] = {0: "batch", 1: "sequence"}
    else:
        past_axis, present_axis = ("capacity", "capacity") if buffered else ("past_length", "total_length")
        dynamic.update({n: {0: "batch", 2: past_axis} for n in kv.past_names()})
        dynamic.update({n: {0: "batch", 2: present_axis} for n in kv.present_names()})
        outputs += kv.present_names()
    dynamic = {k: v for k, v in dynamic.items() if k in set(TOKEN_INPUTS) | set(kv.past_names()) | set(outputs)}
    with export_patches(model):
        return export_lean(graph, (ids, mask, positions, *past_kv), target, store,
                           input_names=list(TOKEN_INPUTS) + (kv.past_names() if kind == DECODE else []),
                           output_names=outputs, dynamic_axes=dynamic, opset_version=opset,
                           custom_opsets=CUSTOM_OPSETS if buffered else None)


def _trace_mixed(model: Any, exits: tuple[Exit, ...], *, contrast: FusedContrast | None, kv: KVCacheSpec,
                 target: Path, store: WeightStore, opset: int, dola: FusedDola | None) -> Path:
    """A MIXED graph (`ExitGraph`): 2 decode rows beside a one-row chunk of 3 tokens as the example (sizes that
    differ, so that no axis is traced as another's), every size but the chunk's one row dynamic."""
    if kv.layout != BUFFER_LAYOUT:
        raise ValueError("a mixed-step graph needs the KV buffer layout")
    graph = ExitGraph(model, exits, kind=MIXED, contrast=contrast, dola=dola, buffered=True)
    rows, past, chunk_tokens, chunk_past = 2, 4, 3, 5
    vocab = model.config.vocab_size
    dtype = next(model.parameters()).dtype
    decode = (torch.randint(0, vocab, (rows, 1)), torch.ones(rows, past + 1, dtype=torch.int64),
              torch.full((rows, 1), past, dtype=torch.int64))
    chunk = (torch.randint(0, vocab, (1, chunk_tokens)), torch.ones(1, chunk_past + chunk_tokens, dtype=torch.int64),
             torch.arange(chunk_past, chunk_past + chunk_tokens)[None])
    buffers = [torch.zeros(rows, kv.num_kv_heads, past + 8, kv.head_dim, dtype=dtype) for _ in range(2 * kv.num_layers)]
    buffers += [torch.zeros(1, kv.num_kv_heads, chunk_past + chunk_tokens + 8, kv.head_dim, dtype=dtype)
                for _ in range(2 * kv.num_layers)]
    outputs = ([LOGITS_OUTPUT] + ([CONTRAST_OUTPUT] if contrast else []) + ([DOLA_OUTPUT] if dola else [])
               + kv.present_names() + kv.chunk_present_names())
    chunk_ids, chunk_mask, chunk_positions = CHUNK_TOKEN_INPUTS
    dynamic = {INPUT_IDS: {0: "rows"}, ATTENTION_MASK: {0: "rows", 1: "total_length"}, POSITION_IDS: {0: "rows"},
               chunk_ids: {1: "chunk_tokens"}, chunk_mask: {1: "chunk_total_length"}, chunk_positions: {1: "chunk_tokens"},
               LOGITS_OUTPUT: {0: "all_rows"}, CONTRAST_OUTPUT: {0: "all_rows"}, DOLA_OUTPUT: {0: "all_rows"}}
    dynamic.update({n: {0: "rows", 2: "capacity"} for n in kv.past_names() + kv.present_names()})
    dynamic.update({n: {2: "chunk_capacity"} for n in kv.chunk_past_names() + kv.chunk_present_names()})
    dynamic = {k: v for k, v in dynamic.items() if k in outputs or not k.endswith("_scores")}
    with export_patches(model):
        return export_lean(graph, (*decode, *chunk, *buffers), target, store,
                           input_names=list(TOKEN_INPUTS) + list(CHUNK_TOKEN_INPUTS) + kv.past_names()
                           + kv.chunk_past_names(), output_names=outputs, dynamic_axes=dynamic,
                           opset_version=opset, custom_opsets=CUSTOM_OPSETS)
