"""Export-time validation of a T5 bundle against the Hugging Face model's own forward.

Two prompts (the shorter left-padded) go through the encoder graph; its cross-attention keys and
values are compared with those the PyTorch model caches. The decode graphs then run a decoder
prefix (the start token and eight more) and `steps` cached steps, fed the encoder graph's outputs
as the runtime feeds them, against PyTorch fed the same tokens (its greedy choice): exit logits,
the fused contrast and the self-attention present KV. Score graphs get the whole decoder
sequence at once. Same report and tolerances as decoder-only exports (validation.py).

>>> report = validate_t5_graphs(model, bundle_dir, graphs, kv, tolerance=TOLERANCES["float32"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autocontrast.bundle import DECODE, ENCODER, SCORE, GraphSpec, KVCacheSpec
from autocontrast.export.t5 import encoder_decoder_spec
from autocontrast.export.validation import (
    Tolerance,
    _check,
    expected_outputs,
    max_abs_diff,
    validation_batch,
)
from autocontrast.models.contrast import calculate_contrasted_logits


def t5_step(model: Any, exits: Sequence[Any], encoder_hidden: torch.Tensor, source_mask: np.ndarray,
            decoder_ids: np.ndarray, decoder_mask: np.ndarray, cache: Any, *, last_only: bool = True
            ) -> tuple[dict[Any, torch.Tensor], Any]:
    """PyTorch reference: each exit's logits, (batch, vocab) of the last position or (batch, seq, vocab),
    and the model's cache. decoder_mask covers past + new decoder tokens."""
    with torch.no_grad():
        out = model(encoder_outputs=(encoder_hidden,), attention_mask=torch.from_numpy(source_mask),
                    decoder_input_ids=torch.from_numpy(decoder_ids), decoder_attention_mask=torch.from_numpy(decoder_mask),
                    past_key_values=cache, use_cache=cache is not None or last_only, output_hidden_states=True)
        logits = out.logits[:, -1:, :] if last_only else out.logits
        by_exit = model.exit_logits(tuple(exits), logits, out.decoder_hidden_states)
    return {e: (v[:, -1, :] if last_only else v).float() for e, v in by_exit.items()}, out.past_key_values


def _encoder_hidden(model: Any, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model.get_encoder()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                   return_dict=True).last_hidden_state  # (batch, source, d_model)


def _layers(cache: Any) -> list[np.ndarray]:
    return [t.numpy() for layer in cache.layers for t in (layer.keys, layer.values)]


def _run(session: Any, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with the feeds the graph declares: one whose exits all lie below the top layer never
    reads the top layers' cross-attention KV, and the tracer leaves those inputs out."""
    declared = {i.name for i in session.get_inputs()}
    return session.run(outputs, {k: v for k, v in feeds.items() if k in declared})


def _real_diff(want: list[np.ndarray], have: list[np.ndarray], real: np.ndarray) -> float:
    """Max diff over (batch, heads, length, head_dim) tensors at the real (unpadded) positions only."""
    return max([0.0] + [max_abs_diff(w.transpose(0, 2, 1, 3)[real], h.transpose(0, 2, 1, 3)[real])
                        for w, h in zip(want, have, strict=True)])


def validate_t5_graphs(model: Any, bundle_dir: Path, graphs: Sequence[GraphSpec], kv: KVCacheSpec, *,
                       tolerance: Tolerance, tokenizer: Any = None, steps: int = 4) -> dict[str, Any]:
    """Compare every graph of a T5 bundle with PyTorch; raise `ExportValidationError` beyond tolerance."""
    import onnxruntime as ort

    spec = encoder_decoder_spec(model)
    ids, mask = validation_batch(tokenizer, model.config.vocab_size)  # (batch, source), left-padded
    batch = ids.shape[0]
    sessions = {g.name: ort.InferenceSession(str(bundle_dir / g.file), providers=["CPUExecutionProvider"])
                for g in graphs}
    report: dict[str, Any] = {"tolerance": tolerance.to_dict(), "batch": batch, "prompt_length": int(ids.shape[1]),
                              "decode_steps": steps, "graphs": {g.name: {} for g in graphs}}
    encoder_hidden = _encoder_hidden(model, ids, mask)
    encoder = next(g for g in graphs if g.kind == ENCODER)
    cross = sessions[encoder.name].run(spec.cross_names(), {"input_ids": ids, "attention_mask": mask})
    start = np.full((batch, 1), spec.decoder_start_token_id, np.int64)
    # a prefix of 9 decoder tokens: past 8 positions the relative-position buckets turn logarithmic
    prefix = np.concatenate([start, ids[:1, -8:].repeat(batch, axis=0)], axis=1)  # (batch, 9)
    _, cache = t5_step(model, (), encoder_hidden, mask, prefix[:, :1], np.ones((batch, 1), np.int64), None)
    want_cross = _layers(cache.cross_attention_cache)
    report["graphs"][encoder.name]["cross_key_values.*"] = _real_diff(want_cross, cross, mask.astype(bool))
    feeds = {spec.encoder_attention_mask: mask, **dict(zip(spec.cross_names(), cross, strict=True))}
    decoded = _validate_decode(model, [g for g in graphs if g.kind == DECODE], sessions, kv, encoder_hidden, mask,
                               feeds, prefix, steps, report)
    for g in (g for g in graphs if g.kind == SCORE):
        by_exit, _ = t5_step(model, g.exits, encoder_hidden, mask, decoded, np.ones_like(decoded), None,
                             last_only=False)
        expected = {g.logits_output: torch.stack([by_exit[e] for e in g.exits], dim=2).numpy()}
        if g.contrast is not None:
            c = g.contrast
            expected[c.output] = calculate_contrasted_logits(by_exit[c.upper], by_exit[c.lower], alpha=c.alpha,
                                                             minimum_candidates=c.minimum_candidates).numpy()
        positions = np.broadcast_to(np.arange(decoded.shape[1], dtype=np.int64), decoded.shape).copy()
        got = _run(sessions[g.name], list(expected), {"input_ids": decoded, "attention_mask": np.ones_like(decoded),
                                                      "position_ids": positions, **feeds})
        report["graphs"][g.name] = {name: max_abs_diff(want, have)
                                    for (name, want), have in zip(expected.items(), got, strict=True)}
    _check(report, graphs, tolerance)
    return report


def _validate_decode(model: Any, decode: Sequence[GraphSpec], sessions: dict[str, Any], kv: KVCacheSpec,
                     encoder_hidden: torch.Tensor, source_mask: np.ndarray, feeds: dict[str, np.ndarray],
                     prefix: np.ndarray, steps: int, report: dict[str, Any]) -> np.ndarray:
    """Prefix + `steps` cached steps through each decode graph; returns the decoder tokens (batch, seq)."""
    batch = prefix.shape[0]
    empty = np.zeros((batch, kv.num_kv_heads, 0, kv.head_dim), np.float32)  # (batch, kv_heads, 0, head_dim)
    pasts = {g.name: [empty] * (2 * kv.num_layers) for g in decode}
    all_exits = tuple(dict.fromkeys(e for g in decode for e in g.exits)) or ("original",)
    ids, sequence, cache = prefix, prefix, None
    for _ in range(steps + 1):
        mask = np.ones((batch, sequence.shape[1]), np.int64)  # decoder rows are never padded
        positions = np.broadcast_to(np.arange(sequence.shape[1] - ids.shape[1], sequence.shape[1]), ids.shape)
        positions = positions.astype(np.int64)
        by_exit, cache = t5_step(model, all_exits, encoder_hidden, source_mask, ids, mask, cache)
        want_present = _layers(cache.self_attention_cache)
        for g in decode:
            expected = expected_outputs(g, by_exit)
            got = _run(sessions[g.name], list(expected) + kv.present_names(),
                       {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                        **feeds, **dict(zip(kv.past_names(), pasts[g.name], strict=True))})
            figures = report["graphs"][g.name]
            for (name, want), have in zip(expected.items(), got, strict=False):
                figures[name] = max(figures.get(name, 0.0), max_abs_diff(want, have))
            present = got[len(expected):]
            figures["present.*"] = max(figures.get("present.*", 0.0), _real_diff(want_present, present, mask > 0))
            pasts[g.name] = present
        ids = by_exit[all_exits[0]].argmax(-1).numpy().astype(np.int64)[:, None]  # teacher forcing: (batch, 1)
        sequence = np.concatenate([sequence, ids], axis=1)
    return sequence[:, :-1]  # the last token was never fed
