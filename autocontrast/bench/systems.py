"""The benchmarked systems: which exist, and how a worker builds one from its spec."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from autocontrast.errors import ConfigurationError

# Our runtime, in each decoding mode (per provider and variant, see system_specs).
OURS_MODES = ("original", "exit", "acd-fused", "acd-numpy")
PEERS = ("torch-acd", "torch-greedy", "optimum-greedy")
# what no step can beat: one ONNX Runtime MatMul over the fp32 bundle's weight bytes (bench/floor.py)
FLOOR = "ort-matmul-floor"
DEFAULT_SYSTEMS = tuple(f"ours-{m}" for m in OURS_MODES) + PEERS + (FLOOR,)


@dataclasses.dataclass(frozen=True)
class SystemSpec:
    """A system to benchmark, built inside its worker by `build`."""

    name: str
    kind: str  # 'ours', 'torch', 'torch-acd', 'optimum'
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


def _exits(text: str) -> tuple[Any, ...]:
    from autocontrast.config import parse_exits

    return tuple(parse_exits(text) or ())


def _bundle_contrast(bundle: Any) -> tuple[Any, ...]:
    """The contrast the bundle fuses: a generic tool takes its exits from the bundle, never a model's numbers."""
    from autocontrast.bundle import read_manifest

    fused = read_manifest(bundle).fused_contrast
    if fused is None:
        raise ConfigurationError(f"{bundle} fuses no contrast; pass --contrast UPPER,LOWER")
    return (fused.upper, fused.lower)


def requested_providers(text: str) -> list[str]:
    """`--providers` as canonical names ('cpu', 'cuda', 'tensorrt'), in order, without repeats.

    An unknown name is a `ProviderUnavailableError`; whether a provider is installed is checked
    by `check_providers_available`, not here, so `--list-systems` works on any machine.
    """
    from autocontrast.runtime.providers import normalize_provider

    names = [normalize_provider(p) for p in text.split(",") if p.strip()]
    if not names:
        raise ConfigurationError("--providers is empty; give one or more of cpu,cuda,tensorrt")
    return list(dict.fromkeys(names))


def check_providers_available(text: str) -> None:
    """Refuse, before anything loads, a provider this onnxruntime cannot run (never a silent skip)."""
    from autocontrast.runtime.providers import resolve_providers

    for provider in requested_providers(text):
        resolve_providers(provider)


def system_specs(args: argparse.Namespace) -> list[SystemSpec]:
    """Every system the command line asks for, with its provider/variant expanded."""
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in DEFAULT_SYSTEMS]
    if unknown:
        raise ConfigurationError(f"unknown system(s) {unknown}; known: {', '.join(DEFAULT_SYSTEMS)}")
    # None: the bundle's fused contrast and its lower exit, read where the bundle is opened
    contrast = _exits(args.contrast) if args.contrast else None
    if contrast is not None and len(contrast) != 2:
        raise ConfigurationError(f"--contrast needs UPPER,LOWER, got {args.contrast!r}")
    exit_ = _exits(args.exit_)[0] if args.exit_ else None
    providers = requested_providers(args.providers)
    bundles = [("fp32", args.bundle), ("int8", args.int8_bundle), ("int4", args.int4_bundle),
               ("fp16", args.fp16_bundle)]
    specs = []
    for variant, bundle in bundles:
        if bundle is None:
            continue
        for provider in providers:
            for mode in OURS_MODES:
                if f"ours-{mode}" not in wanted:
                    continue
                suffix = "" if (variant, provider) == ("fp32", "cpu") else f"-{variant}-{provider}"
                shares = (False, True) if getattr(args, "share_weights", False) and provider == "cpu" else (False,)
                for share in shares:
                    specs.append(SystemSpec(f"ours-{mode}{suffix}{'-shared' if share else ''}", "ours", {
                        "bundle": str(bundle), "mode": mode, "provider": provider, "contrast": contrast,
                        "exit": exit_, "share_weights": share}))
    if FLOOR in wanted:
        specs.append(SystemSpec(FLOOR, "floor", {"bundle": str(args.bundle)}))
    model = str(args.model) if args.model else ""
    if "torch-acd" in wanted:
        specs.append(SystemSpec("torch-acd", "torch-acd", {"model": model,
                                                           "contrast": contrast or _bundle_contrast(args.bundle)}))
    if "torch-greedy" in wanted:
        specs.append(SystemSpec("torch-greedy", "torch", {"model": model}))
    if "optimum-greedy" in wanted:
        from autocontrast.models.smollm2 import cache_dir

        cache = cache_dir() / "optimum" / (args.model.name if args.model else "none")
        specs.append(SystemSpec("optimum-greedy", "optimum", {"model": model, "cache_dir": str(cache)}))
    return specs


def build(spec: SystemSpec) -> Any:
    """The system object for a spec (called inside the worker process)."""
    p = spec.params
    if spec.kind == "ours":
        from autocontrast.bench.ours import RuntimeSystem

        return RuntimeSystem(p["bundle"], mode=p["mode"], provider=p["provider"],
                             contrast=tuple(p["contrast"]) if p["contrast"] else None, exit_=p["exit"],
                             share_weights=p.get("share_weights", False))
    if spec.kind == "floor":
        from autocontrast.bench.floor import MatMulFloorSystem

        return MatMulFloorSystem(p["bundle"])
    from autocontrast.bench import peers

    if spec.kind == "torch":
        return peers.TorchSystem(p["model"])
    if spec.kind == "torch-acd":
        return peers.TorchSystem(p["model"], contrast=tuple(p["contrast"]))
    if spec.kind == "optimum":
        return peers.OptimumSystem(p["model"], cache_dir=p["cache_dir"])
    raise ConfigurationError(f"unknown system kind {spec.kind!r}")
