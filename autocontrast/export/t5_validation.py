"""Export-time validation of a T5 bundle against the Hugging Face model's own forward.

Two prompts (the shorter left-padded) go through the encoder graph (the runtime's
`EncoderSession`); its cross-attention keys and values are compared with those the PyTorch model
caches. The decode graphs then run, through the runtime's `EncoderDecoderState`, a decoder prefix
(the start token and eight more) and `steps` cached steps, against PyTorch fed the same tokens
(its greedy choice): exit logits, the fused contrast and the self-attention present KV. Score graphs get the whole decoder
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
from autocontrast.runtime.encoder import EncoderSession
from autocontrast.runtime.encoder_decoder_state import EncoderDecoderState
from autocontrast.runtime.session import ExitSession


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


def _real_diff(want: list[np.ndarray], have: list[np.ndarray], real: np.ndarray) -> float:
    """Max diff over (batch, heads, length, head_dim) tensors at the real (unpadded) positions only."""
    return max([0.0] + [max_abs_diff(w.transpose(0, 2, 1, 3)[real], h.transpose(0, 2, 1, 3)[real])
                        for w, h in zip(want, have, strict=True)])


def validate_t5_graphs(model: Any, bundle_dir: Path, graphs: Sequence[GraphSpec], kv: KVCacheSpec, *,
                       tolerance: Tolerance, tokenizer: Any = None, steps: int = 4) -> dict[str, Any]:
    """Compare every graph of a T5 bundle with PyTorch; raise `ExportValidationError` beyond tolerance."""
    spec = encoder_decoder_spec(model)
    vocab = model.config.vocab_size
    ids, mask = validation_batch(tokenizer, vocab)  # (batch, source), left-padded
    batch = ids.shape[0]
    report: dict[str, Any] = {"tolerance": tolerance.to_dict(), "batch": batch, "prompt_length": int(ids.shape[1]),
                              "decode_steps": steps, "graphs": {g.name: {} for g in graphs}}
    encoder_graph = next(g for g in graphs if g.kind == ENCODER)
    encoder = EncoderSession(bundle_dir, encoder_graph, spec=spec, pad_token_id=int(model.config.pad_token_id or 0))
    sessions = {g.name: ExitSession(bundle_dir, g, kv=kv, vocab_size=vocab, extra_inputs=(spec.encoder_attention_mask,))
                for g in graphs if g.kind != ENCODER}
    prompts = [list(r[m.astype(bool)]) for r, m in zip(ids, mask, strict=True)]
    cross = encoder.encode(prompts)  # the runtime's encoder: the same left padding as `mask`
    encoder_hidden = _encoder_hidden(model, ids, mask)
    # a prefix of 9 decoder tokens: past 8 positions the relative-position buckets turn logarithmic
    start = np.full((batch, 1), spec.decoder_start_token_id, np.int64)
    prefix = np.concatenate([start, ids[:1, -8:].repeat(batch, axis=0)], axis=1)  # (batch, 9)
    _, cache = t5_step(model, (), encoder_hidden, mask, prefix[:, :1], np.ones((batch, 1), np.int64), None)
    report["graphs"][encoder_graph.name]["cross_key_values.*"] = _real_diff(
        _layers(cache.cross_attention_cache), cross.arrays, mask.astype(bool))
    decoded = _validate_decode(model, [g for g in graphs if g.kind == DECODE], sessions, encoder, encoder_hidden,
                               prompts, mask, prefix, steps, report)
    for g in (g for g in graphs if g.kind == SCORE):
        by_exit, _ = t5_step(model, g.exits, encoder_hidden, mask, decoded, np.ones_like(decoded), None,
                             last_only=False)
        expected = {g.logits_output: torch.stack([by_exit[e] for e in g.exits], dim=2).numpy()}
        if g.contrast is not None:
            c = g.contrast
            expected[c.output] = calculate_contrasted_logits(by_exit[c.upper], by_exit[c.lower], alpha=c.alpha,
                                                             minimum_candidates=c.minimum_candidates).numpy()
        positions = np.broadcast_to(np.arange(decoded.shape[1], dtype=np.int64), decoded.shape).copy()
        out = sessions[g.name].step(decoded, np.ones_like(decoded), positions, None, extra=cross.feeds())
        got = {g.logits_output: out.exit_logits, **({g.contrast.output: out.contrast} if g.contrast else {})}
        report["graphs"][g.name] = {name: max_abs_diff(want, got[name]) for name, want in expected.items()}
    _check(report, graphs, tolerance)
    return report


def _validate_decode(model: Any, decode: Sequence[GraphSpec], sessions: dict[str, ExitSession],
                     encoder: EncoderSession, encoder_hidden: torch.Tensor, prompts: list[list[int]],
                     source_mask: np.ndarray, prefix: np.ndarray, steps: int, report: dict[str, Any]) -> np.ndarray:
    """Drive each decode graph through the runtime's `EncoderDecoderState` (the one decode loop),
    teacher-forced: the prefix, then `steps` tokens. Returns the decoder tokens fed (batch, seq)."""
    start = encoder.spec.decoder_start_token_id
    states = {g.name: EncoderDecoderState(encoder, sessions[g.name], start_token_id=start) for g in decode}
    all_exits = tuple(dict.fromkeys(e for g in decode for e in g.exits)) or ("original",)
    ids, sequence, cache = prefix, prefix, None
    for step in range(steps + 1):
        mask = np.ones((prefix.shape[0], sequence.shape[1]), np.int64)  # decoder rows are never padded
        by_exit, cache = t5_step(model, all_exits, encoder_hidden, source_mask, ids, mask, cache)
        want_present = _layers(cache.self_attention_cache)
        for g in decode:
            state = states[g.name]
            out = (state.extend([p + list(r[1:]) for p, r in zip(prompts, prefix, strict=True)],
                                prompt_lengths=[len(p) for p in prompts]) if step == 0 else state.advance(ids[:, 0]))
            got = {g.logits_output: out.exit_logits, **({g.contrast.output: out.contrast} if g.contrast else {})}
            figures = report["graphs"][g.name]
            for name, want in expected_outputs(g, by_exit).items():
                figures[name] = max(figures.get(name, 0.0), max_abs_diff(want, got[name]))
            figures["present.*"] = max(figures.get("present.*", 0.0),
                                       _real_diff(want_present, state.decoder.cache.arrays(), mask > 0))
        ids = by_exit[all_exits[0]].argmax(-1).numpy().astype(np.int64)[:, None]  # teacher forcing: (batch, 1)
        sequence = np.concatenate([sequence, ids], axis=1)
    return sequence[:, :-1]  # the last token was never fed
