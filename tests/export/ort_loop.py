"""A minimal ONNX Runtime driver of a bundle graph for tests (independent of the exporter's validation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


class GraphRunner:
    """Runs one decode graph of a bundle step by step, keeping the KV cache between calls."""

    def __init__(self, bundle: Path, graph: str):
        manifest = json.loads((bundle / "manifest.json").read_text())
        spec = next(g for g in manifest["graphs"] if g["name"] == graph)
        kv = manifest["kv_cache"]
        self.heads, self.head_dim = kv["num_kv_heads"], kv["head_dim"]
        self.layers = spec.get("layers") or kv["num_layers"]  # an early-exit graph caches only its layers
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        self.present_names = [f"present.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        self.exits = [e if e == "original" else int(e) for e in spec["exits"]]
        self.contrast = spec["contrast"]["output"] if spec.get("contrast") else None
        self.session = ort.InferenceSession(str(bundle / spec["file"]), providers=["CPUExecutionProvider"])
        self.past: list[np.ndarray] | None = None
        self.mask: np.ndarray | None = None
        self.positions: np.ndarray | None = None

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """ids, mask: (batch, seq) left-padded."""
        batch = ids.shape[0]
        self.past = [np.zeros((batch, self.heads, 0, self.head_dim), np.float32)] * (2 * self.layers)
        self.mask = mask.astype(np.int64)
        positions = np.clip(np.cumsum(self.mask, axis=1) - 1, 0, None)
        return self._run(ids.astype(np.int64), positions)

    def step(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """tokens: (batch,) the next token of each row."""
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        return self._run(tokens.astype(np.int64)[:, None], self.positions[:, -1:] + 1)

    def _run(self, ids: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        self.positions = positions
        names = ["exit_logits"] + ([self.contrast] if self.contrast else []) + self.present_names
        feeds = {"input_ids": ids, "attention_mask": self.mask, "position_ids": positions,
                 **dict(zip(self.past_names, self.past, strict=True))}
        out = dict(zip(names, self.session.run(names, feeds), strict=True))
        self.past = [out[n] for n in self.present_names]
        return out
