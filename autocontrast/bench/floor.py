"""The floor a decode step cannot beat on this machine: one ONNX Runtime MatMul that reads as many
weight bytes as one step of the bundle reads (every weight once: an fp32 step multiplies each
matrix by one row of activations), timed like a system so it sits in the same table and run.

A step of ours (or any peer's) costs this plus attention, norms and sampling; `--baseline
ort-matmul-floor` prints every system as a multiple of it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from autocontrast.bench.stats import RunTiming
from autocontrast.bundle import weight_bytes


class MatMulFloorSystem:
    """(batch, K) @ (K, N) float32 with K * N * 4 = the bundle's weight bytes; one run per "token"."""

    def __init__(self, bundle: str, *, threads: int | None = None) -> None:
        self.bundle, self.threads = Path(bundle), threads
        self.session: Any = None
        self.rows = self.weight_bytes = 0

    def skip_reason(self) -> str | None:
        try:
            import onnx  # noqa: F401
        except ImportError:
            return "the MatMul floor builds its one-node graph with onnx, which is not installed"
        if not weight_bytes(self.bundle):
            return f"{self.bundle} names no external weights file to size the floor by"
        return None

    def load(self) -> None:
        import tempfile

        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        from autocontrast.bundle import read_manifest
        from autocontrast.export.weights import point_at

        k = read_manifest(self.bundle).hidden_size
        n = max(1, weight_bytes(self.bundle) // (4 * k))
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        # the weight goes to a file the graph points at, so that no protobuf or serialized copy of it is ever
        # made: at a 1B model's 5 GB those copies (4-5x the weight) were more than the machine had
        with tempfile.TemporaryDirectory(prefix="acd-floor-") as folder:
            weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)  # (K, N)
            weight.tofile(Path(folder) / "w.bin")
            self.rows, self.weight_bytes = k, weight.nbytes
            del weight
            w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[k, n])
            point_at(w, "w.bin", 0, self.weight_bytes)
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["y"])], "floor",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], initializer=[w])
            path = Path(folder) / "floor.onnx"
            onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def generate(self, prompts: list[list[int]], new_tokens: int) -> RunTiming:
        x = np.ones((len(prompts), self.rows), dtype=np.float32)  # (batch, K)
        ends, start = [], time.perf_counter()
        for _ in range(new_tokens):
            self.session.run(None, {"x": x})
            ends.append(time.perf_counter() - start)
        return RunTiming(step_ends=tuple(ends), batch=len(prompts))
