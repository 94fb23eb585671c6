"""Decoding modes: which graph a `MultiExitConfiguration` runs on, and how its scores come out.

The same configuration that drives the PyTorch models drives the runtime: the original head, one
exit, the contrast of two exits, or DoLa (the original head against the furthest of its candidates).
The graph's fused contrast (or fused DoLa) is used when it is exactly the one asked for; otherwise the
NumPy contrast (or a custom function, or DoLa) runs on the raw exit logits.
In the shared projection modes the top exit and 'original' are the same logits, so either name
finds a graph that has the other (the manifest resolves those aliases, see `autocontrast.bundle`).
`DecodeMode.scores` is the one function from exit logits to a mode's scores: the decode loop, scoring and the lm-eval adapter all use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from autocontrast.bundle import DECODE, GraphSpec, Manifest
from autocontrast.config import (
    DEFAULT_ALPHA,
    DEFAULT_MINIMUM_CANDIDATES,
    DEFAULT_RELATIVE_TOP,
    ORIGINAL,
    Exit,
    MultiExitConfiguration,
    check_exit_in_range,
)
from autocontrast.errors import ConfigurationError, ContrastFunctionError, UnknownExitError
from autocontrast.runtime.contrast import contrast_scores, dola_scores
from autocontrast.runtime.session import StepOutput

ContrastFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


def graph_with_exits(manifest: Manifest, exits: tuple[Exit, ...], *,
                     kind: str) -> tuple[GraphSpec, tuple[Exit, ...]] | None:
    """The cheapest graph of `kind` returning `exits` (under any alias), with the names it uses; None if none."""
    return manifest.find_graph(exits, kind=kind)


@dataclasses.dataclass(frozen=True)
class DecodeMode:
    """A resolved mode: the graph to run and how to turn its outputs into scores."""

    graph: GraphSpec | None  # None: a mode over logits already computed (scoring)
    name: str  # 'original', 'exit', 'contrast' or 'dola'
    positions: tuple[int, ...]  # indices into the graph's exits: (exit,), (upper, lower) or (mature, *candidates)
    fused: bool = False
    alpha: float = DEFAULT_ALPHA
    minimum_candidates: int = DEFAULT_MINIMUM_CANDIDATES
    contrast_function: ContrastFunction | None = None
    relative_top: float = DEFAULT_RELATIVE_TOP

    @property
    def fused_output(self) -> str | None:
        """The graph's fused output this mode's scores are (None: it reads the exit logits)."""
        if not self.fused or self.graph is None:
            return None
        spec = {"contrast": self.graph.contrast, "dola": self.graph.dola}.get(self.name)
        return spec.output if spec is not None else None

    def scores(self, out: StepOutput) -> np.ndarray:
        """(..., vocab) scores from (..., n_exits, vocab) exit logits (decode: (batch, vocab))."""
        if self.name == "dola":
            if self.fused:
                return out.dola
            candidates = np.moveaxis(out.exit_logits[..., list(self.positions[1:]), :], -2, 0)  # (n, ..., vocab)
            return dola_scores(out.exit_logits[..., self.positions[0], :], candidates, relative_top=self.relative_top)
        if self.name != "contrast":
            return out.exit_logits[..., self.positions[0], :]
        if self.fused:
            return out.contrast
        upper = out.exit_logits[..., self.positions[0], :]  # (..., vocab)
        lower = out.exit_logits[..., self.positions[1], :]
        if self.contrast_function is not None:
            return checked_scores(self.contrast_function(upper, lower), upper.shape, self.contrast_function)
        return contrast_scores(upper, lower, alpha=self.alpha, minimum_candidates=self.minimum_candidates)


def checked_scores(result: object, shape: tuple[int, ...], function: Callable) -> np.ndarray:
    """A user function's scores, refused unless they are a float array of `shape` with a finite value per row."""
    name = getattr(function, "__qualname__", None) or repr(function)
    try:
        scores = np.asarray(result)
    except Exception:  # noqa: BLE001 - any object a user function returns
        scores = np.asarray(None)
    if scores.shape != tuple(shape) or not np.issubdtype(scores.dtype, np.floating):
        raise ContrastFunctionError(
            f"{name} returned {type(result).__name__} of shape {getattr(scores, 'shape', None)} and dtype "
            f"{scores.dtype}; it must return float scores of shape {tuple(shape)} (one row of vocab scores per row)")
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(scores).any(axis=-1)
    if not finite.all():
        raise ContrastFunctionError(f"{name} returned a row with no finite score (all NaN or -inf); every row must "
                                    "keep at least one token possible")
    return scores


def _check_config(manifest: Manifest, config: MultiExitConfiguration) -> None:
    for exit_ in config.required_exits:
        check_exit_in_range(exit_, manifest.num_layers)
    if config.mode == "dola":
        same = [e for e in config.dola_layers if e in manifest.aliases(ORIGINAL)]
        if same:
            raise ConfigurationError(f"DoLa candidate {same[0]} is the model's own head in this "
                                     f"{manifest.projection_mode} bundle (the mature layer): choose lower layers")
    if config.mode == "contrast":
        upper, lower = config.required_exits
        if lower in manifest.aliases(upper):
            raise ConfigurationError(
                f"contrast exits {upper} and {lower} are the same logits in this {manifest.projection_mode} bundle "
                "(the top exit is the model's own head): the contrast would be uniform; contrast with a lower exit")
        if config.minimum_candidates > manifest.vocab_size:
            raise ConfigurationError(f"minimum_candidates ({config.minimum_candidates}) exceeds the vocabulary size "
                                     f"({manifest.vocab_size})")


def mode_over_exits(config: MultiExitConfiguration, exits: Sequence[Exit]) -> DecodeMode:
    """`config` as a mode over exit logits laid out in `exits` order (NumPy or custom contrast)."""
    return DecodeMode(None, config.mode, tuple(list(exits).index(e) for e in config.required_exits),
                      alpha=config.alpha, minimum_candidates=config.minimum_candidates,
                      contrast_function=config.contrast_function, relative_top=config.relative_top)


def mode_on_graph(manifest: Manifest, config: MultiExitConfiguration, graph: GraphSpec, *,
                  fused: bool = True) -> DecodeMode | None:
    """`config` as a mode on `graph` (its fused contrast or DoLa when it is exactly this one), or None if it cannot."""
    _check_config(manifest, config)
    wanted = config.required_exits
    names = manifest.graph_names(graph, wanted)
    if names is None:
        return None
    c = graph.contrast
    if (config.mode == "contrast" and fused and config.contrast_function is None and c is not None
            and c.upper in manifest.aliases(wanted[0]) and c.lower in manifest.aliases(wanted[1])
            and c.minimum_candidates == config.minimum_candidates and abs(c.alpha - config.alpha) <= 1e-12):
        return DecodeMode(graph, "contrast", (graph.exit_position(c.upper), graph.exit_position(c.lower)), fused=True,
                          alpha=config.alpha, minimum_candidates=config.minimum_candidates)
    if config.mode == "dola" and fused and _fused_dola_serves(manifest, graph, config):
        return DecodeMode(graph, "dola", tuple(graph.exit_position(n) for n in names), fused=True,
                          relative_top=config.relative_top)
    return DecodeMode(graph, config.mode, tuple(graph.exit_position(n) for n in names),
                      alpha=config.alpha, minimum_candidates=config.minimum_candidates,
                      contrast_function=config.contrast_function, relative_top=config.relative_top)


def _fused_dola_serves(manifest: Manifest, graph: GraphSpec, config: MultiExitConfiguration) -> bool:
    """Whether `graph`'s fused DoLa is exactly `config`'s: the model's own head against the same candidates in the
    same order (the first on ties is chosen), with the same relative_top."""
    d = graph.dola
    return (d is not None and d.mature in manifest.aliases(ORIGINAL) and len(d.candidates) == len(config.dola_layers)
            and all(c in manifest.aliases(e) for c, e in zip(d.candidates, config.dola_layers, strict=True))
            and abs(d.relative_top - config.relative_top) <= 1e-12)


def resolve_mode(manifest: Manifest, config: MultiExitConfiguration, *, fused: bool = True,
                 kind: str = DECODE, graphs: Sequence[GraphSpec] | None = None) -> DecodeMode:
    """The cheapest graph of `kind` serving `config` (a fused contrast first, then fewest layers, then
    fewest exits); `UnknownExitError` if none."""
    _check_config(manifest, config)
    candidates = [g for g in (manifest.graphs if graphs is None else graphs) if g.kind == kind]
    modes = [m for g in candidates if (m := mode_on_graph(manifest, config, g, fused=fused)) is not None]
    if modes:
        # a fused contrast (or DoLa) first, then the least work: an early-exit graph computes fewer layers
        return min(modes, key=lambda m: (not m.fused, m.graph.cost(manifest.num_layers)))
    wanted = config.required_exits
    have = {str(e) for g in candidates for e in g.exits}
    lacking = [str(e) for e in wanted if not any(str(a) in have for a in manifest.aliases(e))]
    if lacking:
        raise UnknownExitError(f"this bundle has no {kind} graph returning exit(s) {', '.join(lacking)} (its {kind} "
                               f"graphs return {', '.join(sorted(have)) or 'nothing'}); re-export with --exits "
                               f"including {', '.join(map(str, wanted))}")
    raise UnknownExitError(f"no single {kind} graph of this bundle returns all of exits {', '.join(map(str, wanted))} "
                           f"(they are in different graphs); re-export with --exits {','.join(map(str, wanted))} so "
                           "one graph returns them all")


def dola_candidates(manifest: Manifest) -> tuple[Exit, ...]:
    """DoLa's default premature candidates: the fused DoLa's, else the exits returned beside the model's own head
    by the bundle's decode graph with the most of them."""
    if manifest.fused_dola is not None:
        return manifest.fused_dola.candidates
    own = set(manifest.aliases(ORIGINAL))
    best: tuple[Exit, ...] = ()
    for graph in manifest.graphs:
        if graph.kind == DECODE and own & set(graph.exits):
            below = tuple(sorted(e for e in graph.exits if e not in own))
            best = max(best, below, key=len)
    if not best:
        raise ConfigurationError("no decode graph of this bundle returns exits beside the model's own head: re-export "
                                 f"with e.g. --exits original,{manifest.num_layers // 2} or name --exits")
    return best
