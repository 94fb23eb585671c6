"""`acd-bench-serve BUNDLE`: throughput of acd-serve under 1, 4, 8, 16 concurrent streaming clients.

    acd-bench-serve smollm2-acd --concurrency 1,4,8,16 --new-tokens 64 --requests 2

Starts a real `acd-serve` on loopback (its default ACD mode unless --mode), then, for each
concurrency level, runs that many clients at once, each sending `--requests` streamed completions
of exactly `--new-tokens` tokens (end-of-sequence ignored) on WikiText-2 prompts. Reports total
generated tokens per second, per-client tokens per second, and the median time to first token;
the server's continuous batching is what makes 8 clients cost far less than 8 x one client.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from autocontrast.bench.cli import DEFAULT_TEXT
from autocontrast.cli_support import command_parser, run_cli
from autocontrast.errors import ConfigurationError


@dataclasses.dataclass(frozen=True)
class LevelResult:
    clients: int
    requests: int
    tokens: int
    seconds: float
    ttft_median_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _prompts(path: Path, count: int) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 200]
    if len(lines) < count:
        raise ConfigurationError(f"{path} has only {len(lines)} usable lines; need {count}")
    return [line[:300] for line in lines[:count]]


def _stream(base: str, prompt: str, new_tokens: int) -> tuple[int, float]:
    """One streamed completion: (tokens received, time to first token)."""
    import httpx

    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and event["choices"]:
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, first if first is not None else float("nan")


def run_level(base: str, prompts: list[str], clients: int, requests: int, new_tokens: int) -> LevelResult:
    def client(i: int) -> list[tuple[int, float]]:
        return [_stream(base, prompts[(i * requests + r) % len(prompts)], new_tokens) for r in range(requests)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        done = [x for part in pool.map(client, range(clients)) for x in part]
    seconds = time.perf_counter() - start
    return LevelResult(clients, len(done), sum(t for t, _ in done), seconds, statistics.median(f for _, f in done))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(bundle: str, *, max_batch: int, extra: list[str]):
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autocontrast.serve.cli", bundle, "--port", str(port),
                             "--max-batch", str(max_batch), "--log-level", "warning", *extra])
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ConfigurationError("acd-serve did not start; run it by hand to see why")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def table(results: list[LevelResult], new_tokens: int) -> str:
    base = results[0].tokens_per_s
    lines = ["| clients | requests | tokens | seconds | tokens/s | per client tok/s | vs 1 client | TTFT median ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.clients} | {r.requests} | {r.tokens} | {r.seconds:.1f} | {r.tokens_per_s:.1f} | "
                     f"{r.tokens_per_s / r.clients:.1f} | {r.tokens_per_s / base:.2f}x | {r.ttft_median_s * 1000:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = command_parser(prog="acd-bench-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--concurrency", default="1,4,8,16", help="client counts, comma-separated")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=2, help="requests per client per level")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="prompts: long lines of this text file")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("server_args", nargs="*", help="extra acd-serve arguments after --, e.g. -- --mode original")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if not levels or min(levels) < 1:
        raise ConfigurationError(f"--concurrency ({args.concurrency}) must be positive integers")
    prompts = _prompts(args.text, max(levels) * args.requests)
    results = []
    with running_server(args.bundle, max_batch=args.max_batch, extra=args.server_args) as base:
        _stream(base, prompts[0], 4)  # warm-up: sessions loaded, first-run allocations done
        for clients in levels:
            result = run_level(base, prompts, clients, args.requests, args.new_tokens)
            print(f"{clients:>3} clients: {result.tokens_per_s:7.1f} tokens/s", file=sys.stderr, flush=True)
            results.append(result)
    print(table(results, args.new_tokens))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results],
                                        indent=2) + "\n", encoding="utf-8")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
