"""Decoding modes: which graph a `MultiExitConfiguration` runs on, and how its scores come out.

The same configuration that drives the PyTorch models drives the runtime: the original head, one
exit, or the contrast of two exits. The graph's fused contrast is used when it is exactly the
contrast asked for; otherwise the NumPy contrast (or a custom function) runs on the raw exit logits.
In the shared projection modes the top exit and 'original' are the same logits, so either name
finds a graph that has the other.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np

from autocontrast.bundle import DECODE, GraphSpec, Manifest
from autocontrast.config import ORIGINAL, Exit, MultiExitConfiguration, check_exit_in_range
from autocontrast.errors import BundleError, UnknownExitError
from autocontrast.runtime.contrast import contrast_scores
from autocontrast.runtime.session import StepOutput

ContrastFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]
SHARED_MODES = ("SHARED_PROJECTION_DIRECT", "SHARED_PROJECTION_CAST_OUTPUTS")


def exit_aliases(manifest: Manifest, exit_: Exit) -> tuple[Exit, ...]:
    """Names under which a graph may return `exit_`'s logits."""
    if manifest.projection_mode in SHARED_MODES and exit_ in (ORIGINAL, manifest.num_layers):
        return (exit_, manifest.num_layers if exit_ == ORIGINAL else ORIGINAL)
    return (exit_,)


def graph_with_exits(manifest: Manifest, exits: tuple[Exit, ...], *,
                     kind: str) -> tuple[GraphSpec, tuple[Exit, ...]] | None:
    """The cheapest graph of `kind` returning `exits` (under any alias), with the names it uses; None if none."""
    candidates = []
    for names in itertools.product(*(exit_aliases(manifest, e) for e in exits)):
        try:
            candidates.append((manifest.graph_for_exits(names, kind=kind), names))
        except BundleError:
            continue
    return min(candidates, key=lambda c: (len(c[0].exits), c[0].contrast is not None), default=None)


@dataclasses.dataclass(frozen=True)
class DecodeMode:
    """A resolved mode: the graph to run and how to turn its outputs into (batch, vocab) scores."""

    graph: GraphSpec
    name: str  # 'original', 'exit' or 'contrast'
    positions: tuple[int, ...]  # indices into the graph's exits: (exit,) or (upper, lower)
    fused: bool = False
    alpha: float = 0.1
    minimum_candidates: int = 1
    contrast_function: ContrastFunction | None = None

    def scores(self, out: StepOutput) -> np.ndarray:
        """(batch, vocab) scores of the last position."""
        if self.name != "contrast":
            return out.exit_logits[:, self.positions[0], :]
        if self.fused:
            return out.contrast
        upper = out.exit_logits[:, self.positions[0], :]  # (batch, vocab)
        lower = out.exit_logits[:, self.positions[1], :]
        if self.contrast_function is not None:
            return np.asarray(self.contrast_function(upper, lower))
        return contrast_scores(upper, lower, alpha=self.alpha, minimum_candidates=self.minimum_candidates)


def resolve_mode(manifest: Manifest, config: MultiExitConfiguration, *, fused: bool = True) -> DecodeMode:
    """The cheapest decode graph serving `config`; raises `UnknownExitError` for exits the bundle lacks."""
    wanted = config.required_exits
    for exit_ in wanted:
        check_exit_in_range(exit_, manifest.num_layers)
    if config.mode == "contrast" and fused and config.contrast_function is None:
        upper, lower = wanted
        for u, lo in itertools.product(exit_aliases(manifest, upper), exit_aliases(manifest, lower)):
            graph = manifest.fused_graph(u, lo, config.alpha, config.minimum_candidates)
            if graph is not None:
                return DecodeMode(graph, "contrast", (graph.exit_position(u), graph.exit_position(lo)), fused=True,
                                  alpha=config.alpha, minimum_candidates=config.minimum_candidates)
    found = graph_with_exits(manifest, wanted, kind=DECODE)
    if found is None:
        have = ", ".join(str(e) for e in manifest.exits)
        raise UnknownExitError(f"this bundle cannot decode with exit(s) {', '.join(map(str, wanted))}: its "
                               f"decode graphs return {have}; re-export with --exits including them")
    graph, names = found
    return DecodeMode(graph, config.mode, tuple(graph.exit_position(n) for n in names),
                      alpha=config.alpha, minimum_candidates=config.minimum_candidates,
                      contrast_function=config.contrast_function)
