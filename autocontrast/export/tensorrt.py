"""TensorRT engines for a bundle, built through ONNX Runtime's TensorRT execution provider.

Engines are built once at export time into `<bundle>/trt_cache/<graph>/` (engine cache enabled)
with explicit optimization profiles for every dynamic input, and the provider options are
recorded in the manifest (`variant["tensorrt"]`) so the runtime opens its sessions with the same
profile: ORT TensorRT compares the profile with the cached one and reuses the engine (a
different profile would rebuild it). Paths in the recorded options are relative to the bundle.

Without a CUDA GPU, onnxruntime-gpu's TensorRT provider or the TensorRT libraries, asking for
engines is a `ProviderUnavailableError` that names what is missing; nothing is written.

>>> check_tensorrt()  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from autocontrast.bundle import (
    ATTENTION_MASK,
    DECODE,
    INPUT_IDS,
    POSITION_IDS,
    TOKEN_INPUTS,
    GraphSpec,
    Manifest,
)
from autocontrast.errors import ProviderUnavailableError

TRT_PROVIDER = "TensorrtExecutionProvider"
CACHE_DIR = "trt_cache"


def cuda_device_count() -> int:
    """CUDA devices the driver sees (0 without a driver); asks libcuda directly, no torch needed."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def missing_for_tensorrt() -> list[str]:
    """What this machine lacks for TensorRT engines (empty when everything is there)."""
    import onnxruntime as ort

    missing = []
    if cuda_device_count() == 0:
        missing.append("a CUDA GPU with its driver (libcuda found no device)")
    if TRT_PROVIDER not in ort.get_available_providers():
        missing.append(f"onnxruntime-gpu with the {TRT_PROVIDER} (this onnxruntime {ort.__version__} offers "
                       f"{', '.join(ort.get_available_providers())}; pip install 'autocontrast[tensorrt]')")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("the TensorRT libraries (pip install tensorrt)")
    return missing


def check_tensorrt() -> None:
    missing = missing_for_tensorrt()
    if missing:
        raise ProviderUnavailableError("--tensorrt cannot build engines here; missing: " + "; ".join(missing))


def _shapes(graph: GraphSpec, manifest: Manifest, *, batch: int, seq: int, past: int) -> str:
    """An ORT TensorRT profile string: 'input_ids:1x1,attention_mask:1x1,...'."""
    kv = manifest.kv_for(graph)
    dims = {INPUT_IDS: (batch, seq), POSITION_IDS: (batch, seq), ATTENTION_MASK: (batch, past + seq)}
    if graph.kind == DECODE:
        dims.update({n: (batch, kv.num_kv_heads, past, kv.head_dim) for n in kv.past_names()})
    return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in dims.items())


def provider_options(graph: GraphSpec, manifest: Manifest, *, max_batch: int, max_length: int,
                     fp16: bool) -> dict[str, Any]:
    """TensorRT provider options for one graph, with its cache path relative to the bundle."""
    decode = graph.kind == DECODE
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": f"{CACHE_DIR}/{graph.name}",
        "trt_timing_cache_enable": "True",
        "trt_fp16_enable": "True" if fp16 else "False",
        # decode: prefill (past 0, seq up to max_length) and steps (seq 1, past up to max_length - 1)
        "trt_profile_min_shapes": _shapes(graph, manifest, batch=1, seq=1, past=0),
        "trt_profile_opt_shapes": _shapes(graph, manifest, batch=1, seq=1 if decode else 128,
                                          past=min(256, max_length - 1) if decode else 0),
        "trt_profile_max_shapes": _shapes(graph, manifest, batch=max_batch, seq=max_length,
                                          past=max_length - 1 if decode else 0),
    }


def build_engines(bundle_dir: Path, manifest: Manifest, *, log: Callable[[str], None], max_batch: int = 8,
                  max_length: int = 2048) -> Manifest:
    """Build and cache an engine per graph (one run at the opt shape); record the options."""
    import onnxruntime as ort

    max_length = min(max_length, manifest.max_positions)
    fp16 = manifest.variant.get("dtype") == "float16"
    recorded = {}
    for graph in manifest.graphs:
        options = provider_options(graph, manifest, max_batch=max_batch, max_length=max_length, fp16=fp16)
        absolute = dict(options, trt_engine_cache_path=str(bundle_dir / options["trt_engine_cache_path"]))
        Path(absolute["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        log(f"      {graph.name}: building engine (batch <= {max_batch}, length <= {max_length})")
        session = ort.InferenceSession(str(bundle_dir / graph.file),
                                       providers=[(TRT_PROVIDER, absolute), "CUDAExecutionProvider"])
        session.run(None, _opt_feeds(options["trt_profile_opt_shapes"]))
        recorded[graph.name] = options
    variant = dict(manifest.variant, tensorrt={"cache_dir": CACHE_DIR, "max_batch": max_batch,
                                               "max_length": max_length, "provider_options": recorded})
    return dataclasses.replace(manifest, variant=variant)


def _opt_feeds(profile: str) -> dict[str, np.ndarray]:
    feeds = {}
    for item in profile.split(","):
        name, shape = item.split(":")
        dims = tuple(int(d) for d in shape.split("x"))
        feeds[name] = np.ones(dims, np.int64) if name in TOKEN_INPUTS \
            else np.zeros(dims, np.float32)
    return feeds
