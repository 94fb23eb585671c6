"""A real acd-serve process on loopback over the tiny Llama bundle, driven by the official openai client."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, bundle, *args: str, startup_s: float = 120, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="acd-serve-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "autocontrast.serve.cli", str(bundle), "--port",
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
