"""What machine a benchmark ran on: CPU, cores, memory, GPU, library versions. Torch-free."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from typing import Any

LIBRARIES = ("autocontrast", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "torch", "transformers",
             "optimum", "optimum-onnx", "onnx", "onnxruntime-genai", "llama-cpp-python")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def gpus() -> list[dict[str, str]]:
    """GPUs as nvidia-smi names them (empty where there is none)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [line.split(", ") for line in out.strip().splitlines() if line.strip()]
    return [dict(zip(("name", "driver", "memory"), row, strict=False)) for row in rows]


def versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def describe() -> dict[str, Any]:
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        # The module imported, which may not be the `onnxruntime` distribution (onnxruntime-gpu shadowing it).
        imported = f"{onnxruntime.__version__} at {os.path.dirname(onnxruntime.__file__)}"
    except ImportError:  # pragma: no cover - the runtime always has it
        providers, imported = [], None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(), "platform": platform.platform(),
            "python": platform.python_version(), "gpus": gpus(), "onnxruntime_providers": providers,
            "onnxruntime_imported": imported, "versions": versions()}
