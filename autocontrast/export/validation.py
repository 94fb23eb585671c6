"""Export-time validation: the ONNX graphs against the PyTorch model, on the same inputs.

A prefill of a left-padded batch (empty past), then `steps` cached decode steps feeding both
sides the same tokens (the PyTorch model's greedy choice). Every graph output is compared:
exit logits, the fused contrast, the present KV cache. The report (max abs difference per output,
the tolerance, the inputs' shape) goes into the manifest; beyond tolerance is an
`ExportValidationError`.

The PyTorch side runs in float64 (`float64_reference`) where the model is small enough: the
figures then measure the graph's own rounding, not the sum of two float32 implementations'
(SmolLM2's exit logits, as acd-export reports them: 6.2e-5 against float64, 1.1e-4 against
float32 before this reference was float64).

>>> report = validate_graphs(model, bundle_dir, graphs, kv, tolerance=TOLERANCES["float32"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autocontrast.bundle import DECODE, MIXED, SCORE, GraphSpec, KVCacheSpec
from autocontrast.errors import ExportValidationError
from autocontrast.export import memory
from autocontrast.models.contrast import calculate_contrasted_logits, dola_scores
from autocontrast.runtime.decode_state import open_decode_state
from autocontrast.runtime.inplace_state import InPlaceDecodeState
from autocontrast.runtime.mixed_step import mixed_step
from autocontrast.runtime.session import ExitSession, fused_output_names, shared_file_session

VALIDATION_TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs into the forest",
                   "Paris is the capital of")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Max abs difference allowed per output kind; None records the figure without gating on it."""

    logits: float
    present: float
    contrast: float | None

    def to_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


# fp32: ORT and PyTorch sum in different orders; ~1e-5 typical, 1e-4 is optimum's own bar for logits,
# we allow 1e-3 because a 30-layer model accumulates more. Contrast scores are log-probabilities of
# the same logits, but a token exactly at the plausibility threshold may switch sides (DoLa's: at the
# relative-top cut, or two candidates' divergences close enough to swap the choice): recorded only.
TOLERANCES = {
    "float32": Tolerance(logits=1e-3, present=1e-3, contrast=None),
    "float16": Tolerance(logits=0.25, present=0.05, contrast=None),
    "int8": Tolerance(logits=4.0, present=2.0, contrast=None),
    # 4-bit weights move logits further (SmolLM2, blocks of 32, all at 4 bits: 14.8 logits, 6.8 KV
    # measured): the gate catches a broken graph; the recorded teacher-forced agreement measures quality
    "int4": Tolerance(logits=24.0, present=12.0, contrast=None),
}


# parameters outside the decoder layers (embedding, heads, norms) held in float64 for the whole check
REFERENCE_MAX_PARAMETERS = 1_000_000_000


def _decoder_layers(model: Any) -> torch.nn.ModuleList | None:
    """The model's decoder layers: its ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _tensors(module: torch.nn.Module, skip: torch.nn.Module | None = None) -> list[torch.Tensor]:
    """`module`'s parameters and buffers, those inside `skip` left out."""
    inside = {id(t) for t in [*skip.parameters(), *skip.buffers()]} if skip is not None else set()
    return [t for t in [*module.parameters(), *module.buffers()] if id(t) not in inside]


@contextlib.contextmanager
def _widened(tensors: list[torch.Tensor]) -> Iterator[None]:
    """`tensors` in float64 for the block, then their own float32 storage again (never a new float32 copy:
    a checkpoint memory-mapped from disk stays one mapping)."""
    saved = [(t, t.data) for t in tensors if t.dtype == torch.float32]
    with torch.no_grad():
        for t, data in saved:
            t.data = data.to(torch.float64)
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data


@contextlib.contextmanager
def float64_reference(model: Any) -> Iterator[str]:
    """A float32 `model` computing in float64 for the block, then float32 again (exactly: its own float32
    tensors are put back); yields the reference's dtype name.

    Layer by layer: the embedding, heads and norms are float64 for the block, each decoder layer only
    while it runs, so the reference holds one layer's float64 copy, not the model's (a 1.7B model's
    would be 13.6 GB); layers whose float64 copy is at most `REFERENCE_WHOLE_LAYERS_BYTES` are widened
    once, with the rest. A model whose other parameters exceed `REFERENCE_MAX_PARAMETERS` stays as it is.
    """
    first = next(model.parameters())
    layers = _decoder_layers(model)
    outside = _tensors(model, skip=layers)
    if first.dtype != torch.float32 or sum(t.numel() for t in outside) > REFERENCE_MAX_PARAMETERS:
        yield str(first.dtype).removeprefix("torch.")
        return
    if layers is None or 8 * sum(t.numel() for t in _tensors(layers)) <= memory.REFERENCE_WHOLE_LAYERS_BYTES:
        with _widened(_tensors(model)):
            yield "float64"
        return
    running: list[contextlib.ExitStack] = []

    def widen(module: torch.nn.Module, args: Any) -> None:  # a hook returning a value would replace the args
        stack = contextlib.ExitStack()
        stack.enter_context(_widened(_tensors(module)))
        running.append(stack)

    def narrow(module: torch.nn.Module, args: Any, output: Any) -> None:
        running.pop().close()

    hooks = []
    for layer in layers if layers is not None else ():
        hooks += [layer.register_forward_pre_hook(widen), layer.register_forward_hook(narrow)]
    try:
        with _widened(outside):
            yield "float64"
    finally:
        for hook in hooks:
            hook.remove()
        while running:  # a layer that raised
            running.pop().close()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b|, where equal infinities count as 0 and NaN or unequal infinities as inf."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.where(a64 == b64, 0.0, np.abs(a64 - b64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff.max()) if diff.size else 0.0


def validation_batch(tokenizer: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two prompts, the shorter left-padded: ids (batch, seq) int64, mask (batch, seq) int64."""
    if tokenizer is not None:
        rows = [tokenizer.encode(t, add_special_tokens=False) for t in VALIDATION_TEXT]
    else:
        rng = np.random.default_rng(0)
        rows = [list(rng.integers(0, vocab_size, n)) for n in (12, 5)]
    rows = [[int(t) % vocab_size for t in r] for r in rows]
    seq = max(len(r) for r in rows)
    ids = np.zeros((len(rows), seq), np.int64)
    mask = np.zeros((len(rows), seq), np.int64)
    for i, r in enumerate(rows):
        ids[i, seq - len(r):], mask[i, seq - len(r):] = r, 1
    return ids, mask


def positions_for(mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded prefill: (batch, seq) -> (batch, seq), pads at 0."""
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)


def torch_step(model: Any, exits: Sequence[Any], ids: np.ndarray, mask: np.ndarray, pos: np.ndarray,
               cache: Any) -> tuple[dict[Any, torch.Tensor], Any]:
    """The PyTorch model's last-position logits of each exit, (batch, vocab) each, and its cache."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), past_key_values=cache, use_cache=True,
                    output_hidden_states=True)
        by_exit = model.exit_logits(tuple(exits), out.logits[:, -1:, :], out.hidden_states)
    return {e: v[:, -1, :].double() for e, v in by_exit.items()}, out.past_key_values


def expected_outputs(spec: GraphSpec, by_exit: dict[Any, torch.Tensor]) -> dict[str, np.ndarray]:
    """What a decode graph should return for one step, from the PyTorch exits' logits."""
    expected = {spec.logits_output: torch.stack([by_exit[e] for e in spec.exits], dim=1).numpy()}
    return expected | fused_outputs(spec, by_exit)


def fused_outputs(spec: GraphSpec, by_exit: dict[Any, torch.Tensor]) -> dict[str, np.ndarray]:
    """The fused contrast and DoLa a graph should return, from the PyTorch exits' (float64) logits."""
    expected = {}
    if spec.contrast is not None:
        c = spec.contrast
        expected[c.output] = calculate_contrasted_logits(by_exit[c.upper], by_exit[c.lower], alpha=c.alpha,
                                                         minimum_candidates=c.minimum_candidates).numpy()
    if spec.dola is not None:
        d = spec.dola
        premature = torch.stack([by_exit[e] for e in d.candidates])  # (candidates, ..., vocab)
        expected[d.output] = dola_scores(by_exit[d.mature], premature, relative_top=d.relative_top).numpy()
    return expected


def _cache_arrays(cache: Any) -> list[np.ndarray]:
    return [t.numpy() for layer in cache.layers for t in (layer.keys, layer.values)]


def validate_graphs(model: Any, bundle_dir: Path, graphs: Sequence[GraphSpec], kv: KVCacheSpec, *,
                    tolerance: Tolerance, tokenizer: Any = None, steps: int = 4,
                    release_model: bool = False) -> dict[str, Any]:
    """Compare every graph with PyTorch (prefill + `steps` decode steps); raise beyond tolerance.

    PyTorch runs first and its outputs are kept (a few small arrays); then the ONNX Runtime sessions
    open and run the same inputs. `release_model`: free the model's parameters between the two (the
    caller needs the model no more), so the sessions' memory map never sits beside them.
    """
    ids, mask = validation_batch(tokenizer, model.config.vocab_size)
    with float64_reference(model) as reference:
        expected = _reference_outputs(model, graphs, kv, ids, mask, steps)
    if release_model:
        release_parameters(model)
    report = {"batch": int(ids.shape[0]), "prompt_length": int(ids.shape[1]), "decode_steps": steps,
              "graphs": _compare(bundle_dir, graphs, kv, expected, ids, mask, vocab=model.config.vocab_size)}
    report = {"tolerance": tolerance.to_dict(), "reference": f"PyTorch {reference}", **report}
    _check(report, graphs, tolerance)
    return report


def release_parameters(model: Any) -> None:
    """Drop `model`'s parameter and buffer storage (the module is unusable after) and return it to the OS."""
    from autocontrast.export.memory import release_freed_memory

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = torch.empty(0, dtype=tensor.dtype)
    release_freed_memory()


@dataclasses.dataclass
class _Expected:
    """PyTorch's outputs for the validation inputs: per score graph; per decode step (each decode graph's
    outputs, the present KV entries, the token fed next)."""

    score: dict[str, dict[str, np.ndarray]]
    decode: list[dict[str, dict[str, np.ndarray]]]
    present: list[list[np.ndarray]]
    fed: list[np.ndarray]
    chunks: list[list[int]] = dataclasses.field(default_factory=list)  # a MIXED graph's prompt, chunk by chunk
    chunked: list[dict[str, dict[str, np.ndarray]]] = dataclasses.field(default_factory=list)  # after each chunk
    chunk_present: list[np.ndarray] = dataclasses.field(default_factory=list)  # the whole prompt's KV entries


def _reference_outputs(model: Any, graphs: Sequence[GraphSpec], kv: KVCacheSpec, ids: np.ndarray,
                       mask: np.ndarray, steps: int) -> _Expected:
    expected = _Expected({}, [], [], [])
    for g in (g for g in graphs if g.kind == SCORE):  # score graphs: every position of the prompt, no cache
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(positions_for(mask)), use_cache=False,
                        output_hidden_states=True)
            by_exit = model.exit_logits(g.exits, out.logits, out.hidden_states)
        by_exit = {e: v.double() for e, v in by_exit.items()}
        want = {g.logits_output: torch.stack([by_exit[e] for e in g.exits], dim=2).numpy()}
        expected.score[g.name] = want | fused_outputs(g, by_exit)
    decode = [g for g in graphs if g.kind == DECODE]
    if not decode:
        return expected
    all_exits = tuple(dict.fromkeys(e for g in graphs for e in g.exits))
    prompt = [int(t) for r, m in zip(ids, mask, strict=True) for t in r[m.astype(bool)]]  # the prompts, one after another
    pos, cache = positions_for(mask), None
    for _ in range(steps + 1):
        by_exit, cache = torch_step(model, all_exits, ids, mask, pos, cache)
        expected.decode.append({g.name: expected_outputs(g, by_exit) for g in decode})
        expected.present.append([a.copy() for a in _cache_arrays(cache)])
        # teacher forcing: both sides get PyTorch's greedy token from the first exit
        ids, pos = by_exit[all_exits[0]].argmax(-1).numpy().astype(np.int64)[:, None], pos[:, -1:] + 1  # (batch, 1)
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
        expected.fed.append(ids)
    mixed = [g for g in graphs if g.kind == MIXED]
    if mixed:  # a prompt joining in two chunks beside the decode rows' first two steps: its logits after each
        expected.chunks = [prompt[:len(prompt) // 2], prompt[len(prompt) // 2:]]
        for end in (len(expected.chunks[0]), len(prompt)):
            whole = np.array([prompt[:end]], np.int64)
            by_exit, cache = torch_step(model, all_exits, whole, np.ones_like(whole), np.arange(end)[None], None)
            expected.chunked.append({g.name: expected_outputs(g, by_exit) for g in mixed})
        expected.chunk_present = [a[0].transpose(1, 0, 2) for a in _cache_arrays(cache)]  # (length, heads, dim)
    return expected


def _compare(bundle_dir: Path, graphs: Sequence[GraphSpec], kv: KVCacheSpec, expected: _Expected,
             ids: np.ndarray, mask: np.ndarray, *, vocab: int) -> dict[str, dict[str, float]]:
    """Each graph's max abs difference per output from `expected`, run through the runtime's sessions."""
    sessions: dict[str, ExitSession] = {}
    for g in graphs:  # the entries of one switched graph share its session, as in a Generator
        # share_weights: every graph reads the one memory map of weights.bin, none pre-packs a copy of its own
        sessions[g.name] = ExitSession(bundle_dir, g, kv=kv.for_layers(g.cache_layers), vocab_size=vocab,
                                       session=shared_file_session(sessions.values(), g), share_weights=True)
    figures: dict[str, dict[str, float]] = {g.name: {} for g in graphs}
    for g in (g for g in graphs if g.kind == SCORE):
        out = sessions[g.name].step(ids, mask, positions_for(mask), None)
        got = out.by_output(g)
        valid = mask.astype(bool)  # padded positions' logits are meaningless: compare real tokens only
        figures[g.name] = {name: max_abs_diff(want[valid], got[name][valid]) for name, want in expected.score[g.name].items()}
    decode = [g for g in graphs if g.kind == DECODE]
    if decode:
        _compare_decode(decode, sessions, kv, expected, ids, mask, figures)
    for g in (g for g in graphs if g.kind == MIXED):
        _compare_mixed(g, sessions, expected, ids, mask, figures[g.name])
    return figures


def _compare_mixed(graph: GraphSpec, sessions: dict[str, Any], expected: _Expected, ids: np.ndarray,
                   mask: np.ndarray, figures: dict[str, float]) -> None:
    """A MIXED graph's two steps: the validation rows (prefilled by the decode graph it serves) take their first
    two decode tokens while a third prompt joins in two chunks; every row's outputs against PyTorch's, and the
    prompt's KV entries against PyTorch's cache of it."""
    serves = sessions[graph.mixes]
    batch = open_decode_state(serves)
    batch.extend([list(r[m.astype(bool)]) for r, m in zip(ids, mask, strict=True)])
    prompt = InPlaceDecodeState.empty_row(serves, columns=sum(map(len, expected.chunks)))
    for step, chunk in enumerate(expected.chunks):
        decoded, joined = mixed_step(sessions[graph.name], batch, expected.fed[step][:, 0], prompt,
                                     np.array([chunk], np.int64))
        for got, want in ((decoded.by_output(graph), expected.decode[step + 1][graph.mixes]),
                          (joined.by_output(graph), expected.chunked[step][graph.name])):
            for name, value in want.items():
                figures[name] = max(figures.get(name, 0.0), max_abs_diff(value, got[name]))
    figures["present.*"] = max(max_abs_diff(w, h) for w, h in zip(expected.chunk_present, prompt.entries(), strict=True))


def _compare_decode(decode: Sequence[GraphSpec], sessions: dict[str, Any], kv: KVCacheSpec, expected: _Expected,
                    ids: np.ndarray, mask: np.ndarray, figures: dict[str, dict[str, float]]) -> None:
    """Drive each decode graph through the runtime's decode state (the one decode loop), teacher-forced."""
    states = {g.name: open_decode_state(sessions[g.name]) for g in decode}
    rows = [list(r[m.astype(bool)]) for r, m in zip(ids, mask, strict=True)]
    for step, (outputs, want_present) in enumerate(zip(expected.decode, expected.present, strict=True)):
        for g in decode:
            computed = g.layers or kv.num_layers  # a switched early exit's cache also holds layers it leaves alone
            state = states[g.name]
            out = state.extend(rows) if step == 0 else state.advance(expected.fed[step - 1][:, 0])
            got = out.by_output(g)
            graph_figures = figures[g.name]
            for name, want in outputs[g.name].items():
                graph_figures[name] = max(graph_figures.get(name, 0.0), max_abs_diff(want, got[name]))
            real = mask.astype(bool)  # (batch, total): pads' cache entries are never attended to
            graph_figures["present.*"] = max([graph_figures.get("present.*", 0.0)]
                                             + [max_abs_diff(w.transpose(0, 2, 1, 3)[real], h)  # each row's entries
                                                for w, h in zip(want_present[:2 * computed],
                                                             state.entries()[:2 * computed], strict=True)])
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)


def _check(report: dict[str, Any], graphs: Sequence[GraphSpec], tolerance: Tolerance) -> None:
    failures = []
    for g in graphs:
        for name, diff in report["graphs"][g.name].items():
            limit = (tolerance.present if name.endswith(".*") else  # KV caches: present.*, cross_key_values.*
                     tolerance.contrast if name in fused_output_names(g) else tolerance.logits)
            if limit is not None and not diff <= limit:
                failures.append(f"{g.name}:{name} differs by {diff:.3g} (tolerance {limit:g})")
    report["passed"] = not failures
    if failures:
        raise ExportValidationError("exported graphs do not match PyTorch: " + "; ".join(failures)
                                    + "; nothing was written")
