"""A real acd-serve process on loopback over the tiny Llama bundle, driven by the official openai client."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

API_KEY = "test-key-123"


def free_port() -> int:
    """A free loopback port that nothing else started by a test will be handed: below the kernel's
    ephemeral range (which port 0 and Ray's own random ports draw from) and above Ray's worker ports
    (10002..19999). A port from port 0 was once taken by a Ray process before Serve's proxy bound it."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii").read().split()[0])
    candidates = list(range(20000, low))
    random.shuffle(candidates)
    for port in [*candidates[:200], 0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free loopback port")


class ServerProcess:
    def __init__(self, bundle, *args: str, startup_s: float = 120, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        """`command` starts the server (default: this interpreter's `-m autocontrast.serve.cli`)."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="acd-serve-", suffix=".log")  # noqa: SIM115
        command = command or [sys.executable, "-m", "autocontrast.serve.cli"]
        self.proc = subprocess.Popen([*command, str(bundle), "--port",
                                      str(self.port), "--threads", "1", "--log-level", "info", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"acd-serve exited with {self.proc.returncode}: {self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"acd-serve did not answer /health within {startup_s:g} s: {self.output()}")

    def output(self) -> str:
        """What the server has logged so far."""
        self.log.flush()
        return open(self.log.name, encoding="utf-8").read()

    def health(self) -> dict:
        return httpx.get(f"{self.base}/health", timeout=5).json()

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.base}/metrics", timeout=5).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def generator(llama_generator):
    return llama_generator


@pytest.fixture(scope="module")
def server(llama_bundle):
    process = ServerProcess(llama_bundle, "--api-key", API_KEY, "--max-batch", "8", "--max-queue", "32")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=120)
