"""`torch.onnx.export` (TorchScript tracer) that writes the weights once, tensor by tensor, into a `WeightStore`.

Left to itself the exporter holds the model's parameters, the constants it folds from them (every
Linear weight, transposed) and the serialized graph with all of them inside, at once: 4x the weight
bytes above what the process already holds. Here it traces with `export_params=False` (the graph then
takes each parameter as an input, the folded ones named `onnx::MatMul_N`), the parameter values
(folded ones included) are taken from the exporter's own `_model_to_graph` on the way, and each is
written to the store and turned into an initializer pointing there; the folded tensors are dropped as
soon as they are written. Peak: the model plus one set of folded constants.

The capture reads a private function of the exporter; `torch` is pinned, and a version without it
gets a clear `ExportError`, never a silently different export. The exporter's shape inference is given
the small parameters' values only (`_shape_inference_without_weight_values`): it copied every weight
twice per graph.

>>> export_lean(graph, args, Path("work/decode.onnx"), store, input_names=[...], ...)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch

from autocontrast.errors import ExportError
from autocontrast.export.weights import WeightStore

# floating-point parameters of at least this many values reach the exporter's shape inference as shapes only
SHAPE_INFERENCE_VALUE_LIMIT = 1 << 16


@contextlib.contextmanager
def _captured_parameters() -> Iterator[dict[str, torch.Tensor]]:
    """While open, every `torch.onnx.export` records its graph's parameter values (folded constants
    included) in the yielded dict, by the names the exported graph gives them."""
    try:
        from torch.onnx._internal.torchscript_exporter import utils as exporter
        original = exporter._model_to_graph
    except (ImportError, AttributeError):
        raise ExportError(f"this torch ({torch.__version__}) lacks the TorchScript exporter's _model_to_graph, "
                          "which acd-export reads the traced weights from; install the torch version "
                          "pyproject.toml pins") from None
    captured: dict[str, torch.Tensor] = {}

    def capture(*args: Any, **kwargs: Any) -> Any:
        graph, params, out = original(*args, **kwargs)
        captured.update(params)
        return graph, params, out

    exporter._model_to_graph = capture
    try:
        with _shape_inference_without_weight_values():
            yield captured
    finally:
        exporter._model_to_graph = original


@contextlib.contextmanager
def _shape_inference_without_weight_values() -> Iterator[None]:
    """While open, the exporter's ONNX shape inference is given the values of small parameters only.

    The pass copies every value it is given into ONNX tensors (twice per graph: 12 of a 135M export's
    ~30 s of tracing). A shape can depend on a small integer tensor (a Reshape's target), never on a
    weight matrix, whose shape the graph's inputs already declare; the graphs come out the same
    (a test compares them node for node).
    """
    original = getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None)
    if original is None:  # another torch: its exporter runs as it is (the capture above pins the version)
        yield
        return

    def infer(graph: Any, params: dict[str, torch.Tensor], opset: int) -> Any:
        small = {name: value for name, value in params.items()
                 if not value.is_floating_point() or value.numel() < SHAPE_INFERENCE_VALUE_LIMIT}
        return original(graph, small, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = infer
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = original


def export_lean(module: torch.nn.Module, args: tuple, target: Path, store: WeightStore, **options: Any) -> Path:
    """Trace `module(*args)` to `target` (beside `store`) with its weights in the store; returns `target`.

    `options`: `torch.onnx.export`'s keyword arguments (input and output names, dynamic axes, opset...).
    """
    target = Path(target)
    with torch.no_grad(), _captured_parameters() as params, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python values: validation is the real check
        torch.onnx.export(module, args, str(target), dynamo=False, export_params=False, do_constant_folding=True,
                          **options)
    model = onnx.load(str(target))  # structure only: no parameter is in it
    graph = model.graph
    kept = [value for value in graph.input if value.name not in params]
    taken = [value.name for value in graph.input if value.name in params]
    for name in taken:
        graph.initializer.append(store.external(params.pop(name).detach().contiguous().numpy(), name))
    params.clear()  # the folded constants: written, no longer needed
    del graph.input[:]
    graph.input.extend(kept)
    store.flush()
    onnx.save_model(model, str(target))
    return target

