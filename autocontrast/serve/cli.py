"""`acd-serve BUNDLE`: an OpenAI-compatible server over an export bundle, ACD per request.

    acd-serve smollm2-acd                                   # http://127.0.0.1:8000/v1, the bundle's fused ACD
    acd-serve smollm2-acd --mode original --max-batch 16 --api-key "$KEY" --port 9000
    acd-serve smollm2-acd --ray --replicas 2                # 2 replicas on a local Ray cluster (Ray Serve)
    acd-serve /shared/smollm2-acd --ray --ray-address auto --min-replicas 1 --max-replicas 8 --host 0.0.0.0
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from autocontrast.cli_support import command_parser, run_cli
from autocontrast.errors import ConfigurationError
from autocontrast.serve.address import listening_socket
from autocontrast.serve.scheduler import (
    DEFAULT_KV_RESERVE_BYTES,
    DEFAULT_MAX_STEP_TOKENS,
    DEFAULT_PREFIX_CACHE_BYTES,
)

if TYPE_CHECKING:
    from ray.serve import Application

    from autocontrast.serve.app import AppSpec, ServerConfig
    from autocontrast.serve.ray_deployment import RayScaling


def _parser() -> argparse.ArgumentParser:
    from autocontrast.runtime.cli import add_mode_arguments

    p = command_parser(prog="acd-serve", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + "\n".join(__doc__.strip().splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="export bundle directory (made by acd-export)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 429")
    p.add_argument("--max-tokens", type=int, default=1024, help="the most new tokens one request may ask for")
    p.add_argument("--max-step-tokens", type=int, default=DEFAULT_MAX_STEP_TOKENS, metavar="N",
                   help="tokens one step feeds the model: decoding rows first, then chunks of joining prompts, so a "
                        f"long prompt does not freeze running streams (default {DEFAULT_MAX_STEP_TOKENS}; 0: whole "
                        "prompts in one step)")
    p.add_argument("--prefix-cache-mb", type=int, default=DEFAULT_PREFIX_CACHE_BYTES >> 20, metavar="MB",
                   help="prompt caches kept so that a prompt sharing a prefix (a system prompt) prefills only the "
                        f"rest (default {DEFAULT_PREFIX_CACHE_BYTES >> 20} MB per decode graph; 0: off)")
    p.add_argument("--kv-reserve-mb", type=int, default=DEFAULT_KV_RESERVE_BYTES >> 20, metavar="MB",
                   help="KV cache memory touched at start-up, from which requests' caches are cut: memory new to the "
                        "process stalls the first step on it, and every stream beside it (default "
                        f"{DEFAULT_KV_RESERVE_BYTES >> 20} MB; 0: none)")
    p.add_argument("--api-key", default=os.environ.get("ACD_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $ACD_API_KEY, else no key)")
    p.add_argument("--model-name", help="the model id clients send (default: the bundle directory's name)")
    add_mode_arguments(p)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--share-weights", action="store_true",
                   help="CPU: every graph (original, exits, contrast) reads one memory map of the weights "
                        "instead of its own copy; about 1/3 of the memory for three modes, slower steps "
                        "(see README, Memory)")
    p.add_argument("--provider", default="cpu", help="cpu (default), cuda or tensorrt")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for running requests to finish (default 60)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ray = p.add_argument_group("scale-out on Ray Serve (pip install 'autocontrast[cluster]')")
    ray.add_argument("--ray", action="store_true", help="serve as Ray Serve replicas, each its own Generator")
    ray.add_argument("--replicas", type=int, help="replica count (default 1; with autoscaling, the initial one)")
    ray.add_argument("--min-replicas", type=int, help="autoscale between --min-replicas and --max-replicas")
    ray.add_argument("--max-replicas", type=int)
    ray.add_argument("--replica-cpus", type=float, default=1.0,
                     help="Ray CPUs each replica reserves (default 1); --threads defaults to it")
    ray.add_argument("--ray-address", help="an existing cluster ('auto' or ray://HOST:10001); default: start a "
                                           "local one for this server, gone when it stops")
    ray.add_argument("--ray-temp-dir", help="the local cluster's session directory (default Ray's /tmp/ray)")
    return p


_RAY_ONLY = ("replicas", "min_replicas", "max_replicas", "ray_address", "ray_temp_dir")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import uvicorn

        from autocontrast.serve.app import AppSpec, build_app
    except ImportError as err:
        raise ConfigurationError(f"acd-serve needs the serve extra ({err.name} is missing): "
                                 "pip install 'autocontrast[serve]'") from None
    config, banner = _config(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.ray:
        from autocontrast.serve.ray_deployment import serve_on_ray

        spec, scaling = _ray_spec(args, config)
        serve_on_ray(spec, scaling, host=args.host, port=args.port, address=args.ray_address,
                     temp_dir=args.ray_temp_dir, drain_timeout=args.drain_timeout, banner=banner)
        print("acd-serve: stopped", file=sys.stderr)
        return 0
    listener = listening_socket(args.host, args.port)  # a taken port fails now, before the model loads
    app = build_app(AppSpec(str(Path(args.bundle).resolve()), config, provider=args.provider, threads=args.threads,
                            share_weights=args.share_weights))
    print(f"{banner}, on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.drain_timeout, access_log=False))
    # uvicorn handles SIGINT/SIGTERM (stop accepting, let running requests finish, stop the
    # scheduler), then re-raises the signal to the handler it found: make SIGTERM's a quiet exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run(sockets=[listener])
    print("acd-serve: stopped", file=sys.stderr)
    return 0


def ray_app(args: dict[str, str]) -> Application:
    """Ray Serve application builder, for `serve run`, `serve deploy` and KubeRay's RayService: the
    deployment `acd-serve BUNDLE --ray FLAGS` would run, built from the same flags.

    >>> app = ray_app({"bundle": "/models/smollm2-acd", "flags": "--replicas 2 --max-batch 16"})  # doctest: +SKIP

    In a Serve config: `import_path: autocontrast.serve.cli:ray_app` with `args: {bundle: ..., flags: ...}`.
    Only the serving flags apply (replicas, limits, mode); HTTP host and port are the config's.
    """
    from autocontrast.serve.ray_deployment import application

    unknown = set(args) - {"bundle", "flags"}
    if "bundle" not in args or unknown:
        raise ConfigurationError(f"ray_app takes args 'bundle' (required) and 'flags'; got {sorted(args)}")
    parsed = _parser().parse_args([str(args["bundle"]), "--ray", *shlex.split(str(args.get("flags", "")))])
    config, _ = _config(parsed)
    spec, scaling = _ray_spec(parsed, config)
    return application(spec, scaling, drain_timeout=parsed.drain_timeout)


def _config(args: argparse.Namespace) -> tuple[ServerConfig, str]:
    """The server's configuration from the flags (the bundle's manifest read, its mode checked), and the
    line that announces it."""
    from autocontrast.bundle import read_manifest
    from autocontrast.runtime.cli import bundle_mode
    from autocontrast.runtime.modes import resolve_mode
    from autocontrast.serve.app import ServerConfig
    from autocontrast.serve.protocol import Limits

    if not 1 <= args.max_tokens <= 1 << 20:
        raise ConfigurationError(f"--max-tokens ({args.max_tokens}) must be within 1..{1 << 20}")
    if args.max_step_tokens < 0 or args.prefix_cache_mb < 0 or args.kv_reserve_mb < 0:
        raise ConfigurationError(f"--max-step-tokens ({args.max_step_tokens}), --prefix-cache-mb "
                                 f"({args.prefix_cache_mb}) and --kv-reserve-mb ({args.kv_reserve_mb}) must be >= 0")
    given = [f"--{name.replace('_', '-')}" for name in _RAY_ONLY if getattr(args, name) is not None]
    if given and not args.ray:
        raise ConfigurationError(f"{', '.join(given)} only apply with --ray")
    manifest = read_manifest(args.bundle)
    mode = bundle_mode(manifest, args.mode, args.exits, args.alpha, args.minimum_candidates, args.relative_top)
    resolve_mode(manifest, mode)  # a default mode the bundle cannot serve fails now, before any replica starts
    config = ServerConfig(model_name=args.model_name or Path(args.bundle).resolve().name, default_mode=mode,
                          api_key=args.api_key or None, max_batch=args.max_batch, max_queue=args.max_queue,
                          limits=Limits(max_tokens=args.max_tokens), max_step_tokens=args.max_step_tokens or None,
                          prefix_cache_bytes=args.prefix_cache_mb << 20, kv_reserve_bytes=args.kv_reserve_mb << 20)
    banner = (f"acd-serve: {config.model_name} ({mode.description}), batch {args.max_batch}, queue "
              f"{args.max_queue}{', API key required' if config.api_key else ''}")
    return config, banner


def _ray_spec(args: argparse.Namespace, config: ServerConfig) -> tuple[AppSpec, RayScaling]:
    from autocontrast.serve.app import AppSpec
    from autocontrast.serve.ray_deployment import RayScaling

    scaling = RayScaling(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                         replica_cpus=args.replica_cpus)
    # one replica's onnxruntime uses the CPUs it reserved, not every core of its node
    threads = args.threads if args.threads is not None else max(1, int(args.replica_cpus))
    return AppSpec(str(Path(args.bundle).resolve()), config, provider=args.provider, threads=threads,
                   share_weights=args.share_weights), scaling


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
