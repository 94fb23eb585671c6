"""Drive one decode graph of a bundle through the runtime's one decode loop (`open_decode_state`), with
outputs by name, for tests that compare a graph's outputs with PyTorch step by step."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autocontrast.bundle import read_manifest
from autocontrast.runtime.decode_state import open_decode_state
from autocontrast.runtime.session import StepOutput, open_session


class GraphRunner:
    """Runs one decode graph of a bundle step by step, keeping the KV cache between calls."""

    def __init__(self, bundle: Path, graph: str):
        manifest = read_manifest(bundle)
        self.spec = manifest.graph(graph)
        self.exits = list(self.spec.exits)
        self.state = open_decode_state(open_session(Path(bundle), manifest, self.spec))

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """ids, mask: (batch, seq) left-padded."""
        return self._named(self.state.extend([list(r[m.astype(bool)]) for r, m in zip(ids, mask, strict=True)]))

    def step(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """tokens: (batch,) the next token of each row."""
        return self._named(self.state.advance(tokens))

    def _named(self, out: StepOutput) -> dict[str, np.ndarray]:
        named = {self.spec.logits_output: out.exit_logits}
        if self.spec.contrast is not None:
            named[self.spec.contrast.output] = out.contrast
        return named
