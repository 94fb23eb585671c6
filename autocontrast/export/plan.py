"""`PlannedGraph`: one graph `acd-export` will write, decided before anything is traced.

The exporter's plan is a list of these, in manifest order: the decode graphs (the original head, the
stacked exits with their fused contrast and DoLa, early exits), the score graph, and for an encoder-decoder
model the encoder first. A graph that another graph's file serves (the switched decode graph) is
planned but not traced.
"""

from __future__ import annotations

import dataclasses

from autocontrast.config import Exit

FusedContrast = tuple[Exit, Exit, float, int]  # upper exit, lower exit, alpha, minimum candidates
FusedDola = tuple[Exit, tuple[Exit, ...], float]  # mature exit (the model's own head), candidates, relative_top


@dataclasses.dataclass(frozen=True)
class PlannedGraph:
    name: str
    kind: str  # bundle.DECODE, SCORE or ENCODER
    exits: tuple[Exit, ...]
    contrast: FusedContrast | None = None
    dola: FusedDola | None = None
    layers: int | None = None  # an early exit: only layers 1..layers run
    traced: bool = True  # False: served by another graph's file (decode_original and decode_exit_K in the switched graph)
    switched_lower: int | None = None  # decode_exits: merged with decode_original and the early exit at this layer
    mixes: str | None = None  # a MIXED graph: the decode graph whose steps it runs beside a prompt chunk

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def describe(self) -> str:
        """What the progress line says about it."""
        return (f"{self.name!r} ({self.kind}, exits {', '.join(map(str, self.exits))}"
                f"{', fused contrast' if self.contrast else ''}{', fused DoLa' if self.dola else ''}{f', layers 1..{self.layers}' if self.layers else ''}"
                f"{f', steps of {self.mixes} beside a prompt chunk' if self.mixes else ''})")
