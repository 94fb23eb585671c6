"""Execution providers: what the user asks for, checked, never silently replaced by another.

`resolve_providers("cuda")` returns ONNX Runtime's provider list for that choice, or raises
`ProviderUnavailableError` naming what is missing (onnxruntime-gpu, a GPU, TensorRT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort

from autocontrast.errors import ProviderUnavailableError

CPU, CUDA, TENSORRT = "cpu", "cuda", "tensorrt"
ORT_NAMES = {CPU: "CPUExecutionProvider", CUDA: "CUDAExecutionProvider", TENSORRT: "TensorrtExecutionProvider"}
INSTALL_HINT = {CUDA: "pip install 'autocontrast[gpu]' (onnxruntime-gpu) on a machine with a CUDA GPU",
                TENSORRT: "pip install 'autocontrast[tensorrt]' (onnxruntime-gpu and TensorRT) on a machine with a CUDA GPU"}


def normalize_provider(provider: str) -> str:
    key = provider.strip().lower().replace("executionprovider", "")
    key = {"trt": TENSORRT, "gpu": CUDA}.get(key, key)
    if key not in ORT_NAMES:
        raise ProviderUnavailableError(f"unknown provider {provider!r}; choose one of: {', '.join(ORT_NAMES)}")
    return key


def resolve_providers(provider: str, *, device_id: int = 0, trt_options: dict[str, Any] | None = None,
                      bundle_dir: Path | None = None) -> list[Any]:
    """ORT providers for `provider` ('cpu', 'cuda' or 'tensorrt'); raises if it is not installed.

    TensorRT keeps CUDA behind it for the nodes TensorRT cannot take (that is not a fallback to
    another device). `trt_options` are the bundle's recorded TensorRT options (engine cache,
    profiles), with paths relative to `bundle_dir`.
    """
    key = normalize_provider(provider)
    available = ort.get_available_providers()
    if ORT_NAMES[key] not in available:
        raise ProviderUnavailableError(
            f"provider {key!r} is not available in this onnxruntime {ort.__version__} (it offers "
            f"{', '.join(available)}); {INSTALL_HINT.get(key, '')}".rstrip("; "))
    if key == CPU:
        return [ORT_NAMES[CPU]]
    cuda = (ORT_NAMES[CUDA], {"device_id": str(device_id)})
    if key == CUDA:
        return [cuda]
    options = dict(trt_options or {})
    options["device_id"] = str(device_id)
    cache = options.get("trt_engine_cache_path")
    if cache and bundle_dir is not None and not Path(cache).is_absolute():
        options["trt_engine_cache_path"] = str(bundle_dir / cache)
    options.setdefault("trt_engine_cache_enable", "True")
    return [(ORT_NAMES[TENSORRT], options), cuda]


def check_session_providers(session: ort.InferenceSession, provider: str) -> None:
    """ORT quietly drops a provider it cannot initialise (no GPU, missing CUDA libraries): refuse that."""
    key = normalize_provider(provider)
    if ORT_NAMES[key] not in session.get_providers():
        raise ProviderUnavailableError(
            f"onnxruntime could not start the {key!r} provider (the session runs on "
            f"{', '.join(session.get_providers())}); check that a GPU is visible and its CUDA/cuDNN libraries load")


def output_device(provider: str) -> str:
    """Where a session keeps tensors that stay on the accelerator (the KV cache)."""
    return "cpu" if normalize_provider(provider) == CPU else "cuda"
