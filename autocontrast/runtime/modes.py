"""Decoding modes: which graph a `MultiExitConfiguration` runs on, and how its scores come out.

The same configuration that drives the PyTorch models drives the runtime: the original head, one
exit, or the contrast of two exits. The graph's fused contrast is used when it is exactly the
contrast asked for; otherwise the NumPy contrast (or a custom function) runs on the raw exit logits.
In the shared projection modes the top exit and 'original' are the same logits, so either name
finds a graph that has the other (the manifest resolves those aliases, see `autocontrast.bundle`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from autocontrast.bundle import DECODE, GraphSpec, Manifest
from autocontrast.config import (
    DEFAULT_ALPHA,
    DEFAULT_MINIMUM_CANDIDATES,
    Exit,
    MultiExitConfiguration,
    check_exit_in_range,
)
from autocontrast.errors import UnknownExitError
from autocontrast.runtime.contrast import contrast_scores
from autocontrast.runtime.session import StepOutput

ContrastFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


def graph_with_exits(manifest: Manifest, exits: tuple[Exit, ...], *,
                     kind: str) -> tuple[GraphSpec, tuple[Exit, ...]] | None:
    """The cheapest graph of `kind` returning `exits` (under any alias), with the names it uses; None if none."""
    return manifest.find_graph(exits, kind=kind)


@dataclasses.dataclass(frozen=True)
class DecodeMode:
    """A resolved mode: the graph to run and how to turn its outputs into (batch, vocab) scores."""

    graph: GraphSpec
    name: str  # 'original', 'exit' or 'contrast'
    positions: tuple[int, ...]  # indices into the graph's exits: (exit,) or (upper, lower)
    fused: bool = False
    alpha: float = DEFAULT_ALPHA
    minimum_candidates: int = DEFAULT_MINIMUM_CANDIDATES
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
        found = manifest.fused_graph(*wanted, config.alpha, config.minimum_candidates)
        if found is not None:
            graph, (u, lo) = found
            return DecodeMode(graph, "contrast", (graph.exit_position(u), graph.exit_position(lo)), fused=True,
                              alpha=config.alpha, minimum_candidates=config.minimum_candidates)
    found = manifest.find_graph(wanted, kind=DECODE)
    if found is None:
        have = ", ".join(str(e) for e in manifest.exits)
        raise UnknownExitError(f"this bundle cannot decode with exit(s) {', '.join(map(str, wanted))}: its "
                               f"decode graphs return {have}; re-export with --exits including them")
    graph, names = found
    return DecodeMode(graph, config.mode, tuple(graph.exit_position(n) for n in names),
                      alpha=config.alpha, minimum_candidates=config.minimum_candidates,
                      contrast_function=config.contrast_function)
