"""`acd-serve BUNDLE`: an OpenAI-compatible server over an export bundle, ACD per request.

    acd-serve smollm2-acd                                   # http://127.0.0.1:8000/v1, the bundle's fused ACD
    acd-serve smollm2-acd --mode original --max-batch 16 --api-key "$KEY" --port 9000
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from autocontrast.cli_support import run_cli
from autocontrast.errors import ConfigurationError


def _parser() -> argparse.ArgumentParser:
    from autocontrast.runtime.cli import add_mode_arguments

    p = argparse.ArgumentParser(prog="acd-serve", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + "\n".join(__doc__.strip().splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="export bundle directory (made by acd-export)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 429")
    p.add_argument("--max-tokens", type=int, default=1024, help="the most new tokens one request may ask for")
    p.add_argument("--api-key", default=os.environ.get("ACD_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $ACD_API_KEY, else no key)")
    p.add_argument("--model-name", help="the model id clients send (default: the bundle directory's name)")
    add_mode_arguments(p)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--provider", default="cpu", help="cpu (default), cuda or tensorrt")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for running requests to finish (default 60)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import uvicorn

        from autocontrast.serve.app import ServerConfig, create_app
        from autocontrast.serve.protocol import Limits
    except ImportError as err:
        raise ConfigurationError(f"acd-serve needs the serve extra ({err.name} is missing): "
                                 "pip install 'autocontrast[serve]'") from None
    from autocontrast.runtime.cli import bundle_mode
    from autocontrast.runtime.generator import Generator

    if not 1 <= args.max_tokens <= 1 << 20:
        raise ConfigurationError(f"--max-tokens ({args.max_tokens}) must be within 1..{1 << 20}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    generator = Generator(args.bundle, provider=args.provider, threads=args.threads, preload=())
    mode = bundle_mode(generator.manifest, args.mode, args.exits, args.alpha, args.minimum_candidates)
    generator.session(generator.mode(mode).graph)  # load the default mode's graph before taking requests
    config = ServerConfig(model_name=args.model_name or Path(args.bundle).resolve().name, default_mode=mode,
                          api_key=args.api_key or None, max_batch=args.max_batch, max_queue=args.max_queue,
                          limits=Limits(max_tokens=args.max_tokens))
    app = create_app(generator, config)
    print(f"acd-serve: {config.model_name} ({mode.description}) on http://{args.host}:{args.port}/v1, "
          f"batch {args.max_batch}, queue {args.max_queue}{', API key required' if config.api_key else ''}",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.drain_timeout, access_log=False))
    # uvicorn handles SIGINT/SIGTERM (stop accepting, let running requests finish, stop the
    # scheduler), then re-raises the signal to the handler it found: make SIGTERM's a quiet exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    print("acd-serve: stopped", file=sys.stderr)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
