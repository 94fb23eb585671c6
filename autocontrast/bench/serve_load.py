"""`acd-bench-serve BUNDLE`: acd-serve under load, from real HTTP clients on loopback.

    acd-bench-serve smollm2-acd --concurrency 1,4,8,16 --new-tokens 64 --requests 2
    acd-bench-serve smollm2-acd --scenario long-prompt --step-tokens 0,32,64,128,256
    acd-bench-serve smollm2-acd --scenario shared-prefix -- --prefix-cache-mb 0

Starts a real `acd-serve` on loopback (its default ACD mode unless --mode) and runs a scenario:

- `load` (default): for each concurrency level, that many clients at once, each sending
  `--requests` streamed completions of exactly `--new-tokens` tokens (end-of-sequence ignored) on
  WikiText-2 prompts: total and per-client tokens/s, p50/p99 time to first token and inter-token gap.
- `long-prompt`: `--streams` streams of `--stream-tokens` tokens decoding, then one prompt of
  `--long-words` words of WikiText-2 asking for one token: the running streams' median and worst
  inter-token gap, and the long prompt's time to first token against the faster of two such
  prompts alone (measured first; no two of the three share a prefix).
- `shared-prefix`: two chats sharing a system prompt of `--long-words` words, one after the other:
  the second's time to first token against the first's (prefix reuse).

`--step-tokens` runs the scenario once per server `--max-step-tokens` value (0: whole prompts).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from autocontrast.bench.cli import DEFAULT_TEXT
from autocontrast.cli_support import command_parser, run_cli
from autocontrast.errors import ConfigurationError
from autocontrast.serve.scheduler import DEFAULT_MAX_STEP_TOKENS


@dataclasses.dataclass(frozen=True)
class LevelResult:
    clients: int
    requests: int
    tokens: int
    seconds: float
    ttft_median_s: float
    ttft_p99_s: float
    itl_median_s: float
    itl_p99_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _prompts(path: Path, count: int) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 200]
    if len(lines) < count:
        raise ConfigurationError(f"{path} has only {len(lines)} usable lines; need {count}")
    return [line[:300] for line in lines[:count]]


@dataclasses.dataclass(frozen=True)
class Streamed:
    """One streamed answer: tokens the server counted, and when each piece of text arrived (s after sending)."""

    tokens: int
    arrivals: list[float]
    prompt_tokens: int

    @property
    def ttft(self) -> float:
        return self.arrivals[0] if self.arrivals else float("nan")

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.arrivals)]


def _stream(base: str, prompt: str | None, new_tokens: int, *, messages: list[dict[str, str]] | None = None,
            on_first: threading.Event | None = None) -> Streamed:
    """One streamed completion (or chat, given `messages`), every text piece timed."""
    import httpx

    body: dict[str, Any] = {"max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}
    body.update({"messages": messages} if messages is not None else {"prompt": prompt})
    route = "chat/completions" if messages is not None else "completions"
    start = time.perf_counter()
    arrivals: list[float] = []
    tokens = prompt_tokens = 0
    with httpx.stream("POST", f"{base}/v1/{route}", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and _text(event["choices"][0]):
                arrivals.append(time.perf_counter() - start)
                if on_first is not None:
                    on_first.set()
            if event.get("usage"):
                tokens, prompt_tokens = event["usage"]["completion_tokens"], event["usage"]["prompt_tokens"]
    return Streamed(tokens, arrivals, prompt_tokens)


def _text(choice: dict[str, Any]) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_level(base: str, prompts: list[str], clients: int, requests: int, new_tokens: int) -> LevelResult:
    def client(i: int) -> list[Streamed]:
        return [_stream(base, prompts[(i * requests + r) % len(prompts)], new_tokens) for r in range(requests)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        done = [x for part in pool.map(client, range(clients)) for x in part]
    seconds = time.perf_counter() - start
    ttfts, gaps = [d.ttft for d in done], [g for d in done for g in d.gaps]
    return LevelResult(clients, len(done), sum(d.tokens for d in done), seconds, statistics.median(ttfts),
                       _percentile(ttfts, 99), _percentile(gaps, 50), _percentile(gaps, 99))


@dataclasses.dataclass(frozen=True)
class LongPromptResult:
    step_tokens: int  # the server's --max-step-tokens (0: whole prompts)
    prompt_tokens: int
    alone_ttft_s: float
    loaded_ttft_s: float
    gap_median_s: float
    gap_p99_s: float
    gap_worst_s: float


def run_long_prompt(base: str, prompts: list[str], long_prompts: tuple[str, str, str], *, streams: int,
                    stream_tokens: int, step_tokens: int) -> LongPromptResult:
    """Two long prompts alone (the faster is the baseline), then a third while `streams` streams decode; the
    three share no prefix."""
    alone = min((_stream(base, p, 1) for p in long_prompts[:2]), key=lambda s: s.ttft)
    started = [threading.Event() for _ in range(streams)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=streams) as pool:
        running = [pool.submit(_stream, base, prompts[i], stream_tokens, on_first=started[i]) for i in range(streams)]
        for event in started:
            event.wait(timeout=600)
        time.sleep(1.0)  # the streams at their pace
        loaded = _stream(base, long_prompts[2], 1)
        done = [f.result() for f in running]
    gaps = [g for d in done for g in d.gaps]
    return LongPromptResult(step_tokens, loaded.prompt_tokens, alone.ttft, loaded.ttft, _percentile(gaps, 50),
                            _percentile(gaps, 99), max(gaps))


@dataclasses.dataclass(frozen=True)
class SharedPrefixResult:
    step_tokens: int
    first_ttft_s: float
    second_ttft_s: float


def run_shared_prefix(base: str, system: str, questions: tuple[str, str], *, step_tokens: int) -> SharedPrefixResult:
    first, second = (_stream(base, None, 1, messages=[{"role": "system", "content": system},
                                                      {"role": "user", "content": q}]) for q in questions)
    return SharedPrefixResult(step_tokens, first.ttft, second.ttft)


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


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def table(results: list[LevelResult], new_tokens: int) -> str:
    base = results[0].tokens_per_s
    return _markdown(["clients", "requests", "tokens", "seconds", "tokens/s", "per client tok/s", "vs 1 client",
                      "TTFT p50 / p99 ms", "inter-token p50 / p99 ms"],
                     [[str(r.clients), str(r.requests), str(r.tokens), f"{r.seconds:.1f}", f"{r.tokens_per_s:.1f}",
                       f"{r.tokens_per_s / r.clients:.1f}", f"{r.tokens_per_s / base:.2f}x",
                       f"{r.ttft_median_s * 1000:.0f} / {r.ttft_p99_s * 1000:.0f}",
                       f"{r.itl_median_s * 1000:.1f} / {r.itl_p99_s * 1000:.1f}"] for r in results])


def long_prompt_table(results: list[LongPromptResult]) -> str:
    return _markdown(["--max-step-tokens", "long prompt tokens", "its TTFT alone s", "its TTFT among streams s",
                      "ratio", "streams' median gap ms", "p99 gap ms", "worst gap ms", "worst / median"],
                     [[str(r.step_tokens or "whole"), str(r.prompt_tokens), f"{r.alone_ttft_s:.2f}",
                       f"{r.loaded_ttft_s:.2f}", f"{r.loaded_ttft_s / r.alone_ttft_s:.2f}x",
                       f"{r.gap_median_s * 1000:.1f}", f"{r.gap_p99_s * 1000:.0f}", f"{r.gap_worst_s * 1000:.0f}",
                       f"{r.gap_worst_s / r.gap_median_s:.1f}x"] for r in results])


def shared_prefix_table(results: list[SharedPrefixResult]) -> str:
    return _markdown(["--max-step-tokens", "first chat TTFT s", "second chat TTFT s", "second / first"],
                     [[str(r.step_tokens or "whole"), f"{r.first_ttft_s:.2f}", f"{r.second_ttft_s:.2f}",
                       f"{r.second_ttft_s / r.first_ttft_s:.2f}x"] for r in results])


def _words(path: Path, start: int, count: int) -> str:
    words = path.read_text(encoding="utf-8").split()
    if len(words) < start + count:
        raise ConfigurationError(f"{path} has {len(words)} words; the scenario needs {start + count}")
    return " ".join(words[start:start + count])


def main(argv: list[str] | None = None) -> int:
    p = command_parser(prog="acd-bench-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--concurrency", default="1,4,8,16", help="client counts, comma-separated")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=2, help="requests per client per level")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="prompts: long lines of this text file")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--scenario", choices=("load", "long-prompt", "shared-prefix"), default="load")
    p.add_argument("--step-tokens", default=None, metavar="N[,N...]",
                   help="run once per acd-serve --max-step-tokens value (0: whole prompts); default: the server's")
    p.add_argument("--streams", type=int, default=4, help="long-prompt: streams decoding when it arrives")
    p.add_argument("--stream-tokens", type=int, default=300, help="long-prompt: tokens each stream asks for")
    p.add_argument("--long-words", type=int, default=1500,
                   help="words of the long prompt (long-prompt) or of the shared system prompt (shared-prefix)")
    p.add_argument("server_args", nargs="*", help="extra acd-serve arguments after --, e.g. -- --mode original")
    args = p.parse_intermixed_args(argv)  # server arguments after `--` wherever the bundle stands
    levels = [int(c) for c in args.concurrency.split(",")]
    if not levels or min(levels) < 1:
        raise ConfigurationError(f"--concurrency ({args.concurrency}) must be positive integers")
    prompts = _prompts(args.text, max(max(levels) * args.requests, args.streams))
    budgets: list[int | None] = [None] if args.step_tokens is None else [int(v) for v in args.step_tokens.split(",")]
    results: list[Any] = []
    for budget in budgets:
        extra = args.server_args + ([] if budget is None else ["--max-step-tokens", str(budget)])
        with running_server(args.bundle, max_batch=args.max_batch, extra=extra) as base:
            _stream(base, prompts[0], 4)  # warm-up: sessions loaded, first-run allocations done
            results += _scenario(args, base, prompts, levels, budget)
    print({"load": lambda r: table(r, args.new_tokens), "long-prompt": long_prompt_table,
           "shared-prefix": shared_prefix_table}[args.scenario](results))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) | ({"tokens_per_s": r.tokens_per_s} if isinstance(
            r, LevelResult) else {}) for r in results], indent=2) + "\n", encoding="utf-8")
    return 0


def _scenario(args: argparse.Namespace, base: str, prompts: list[str], levels: list[int],
              budget: int | None) -> list[Any]:
    budget = DEFAULT_MAX_STEP_TOKENS if budget is None else budget  # what the server runs with
    label = f"--max-step-tokens {budget}"
    if args.scenario == "long-prompt":
        long_prompts = tuple(_words(args.text, i * args.long_words, args.long_words) for i in range(3))
        result = run_long_prompt(base, prompts, long_prompts, streams=args.streams, stream_tokens=args.stream_tokens,
                                 step_tokens=budget)
        print(f"{label}: TTFT {result.loaded_ttft_s:.2f} s (alone {result.alone_ttft_s:.2f} s), worst gap "
              f"{result.gap_worst_s * 1000:.0f} ms", file=sys.stderr, flush=True)
        return [result]
    if args.scenario == "shared-prefix":
        system = _words(args.text, 0, args.long_words)
        result = run_shared_prefix(base, system, ("Summarise the text above.", "Who is the text about?"),
                                   step_tokens=budget)
        print(f"{label}: second chat {result.second_ttft_s:.2f} s after {result.first_ttft_s:.2f} s", file=sys.stderr,
              flush=True)
        return [result]
    out = []
    for clients in levels:
        result = run_level(base, prompts, clients, args.requests, args.new_tokens)
        print(f"{label}, {clients:>3} clients: {result.tokens_per_s:7.1f} tokens/s", file=sys.stderr, flush=True)
        out.append(result)
    return out


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
