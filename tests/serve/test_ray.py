"""acd-serve --ray: two Ray Serve replicas on a local Ray cluster that the server starts for itself.

Requests are spread over both replicas (the x-acd-replica header says which served each) and
answer exactly what `Generator.generate` does; a replica killed with SIGKILL is replaced by Serve
and no later request fails; SIGTERM stops Serve and every process of the cluster. Slow: starting
Ray takes tens of seconds on two shared cores.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from autocontrast.serve.ray_deployment import REPLICA_HEADER
from tests.serve.conftest import ServerProcess, free_port
from tests.serve.test_server import ACD, PROMPTS

pytest.importorskip("ray.serve", reason="the Ray Serve tests need the cluster extra: pip install 'autocontrast[cluster]'")
pytestmark = pytest.mark.slow

TOKENS = 8
MARK = "ACD_TEST_RAY_RUN"  # every process of the test's cluster inherits this variable: how we find them


@pytest.fixture(scope="module")
def ray_server(llama_bundle):
    temp_dir = tempfile.mkdtemp(prefix="acd-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    run = uuid.uuid4().hex
    server = ServerProcess(llama_bundle, "--ray", "--replicas", "2", "--replica-cpus", "0.5", "--ray-temp-dir",
                           temp_dir, startup_s=300, env={MARK: run, "RAY_USAGE_STATS_ENABLED": "0"})
    server.run = run
    yield server
    server.stop(timeout=120)
    for pid in _processes_marked(run):  # only if a test failed before stopping it: nothing else is ours
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def client(ray_server):
    import openai

    client = openai.OpenAI(base_url=f"{ray_server.base}/v1", api_key="unused", max_retries=0, timeout=120)
    client.model_name = httpx.get(f"{ray_server.base}/v1/models", timeout=30).json()["data"][0]["id"]
    return client


def _processes_marked(run: str) -> list[int]:
    """Every process whose environment carries this test run's mark (the server, Ray's daemons, replicas)."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and f"{MARK}={run}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
    return found


def _left_running(run: str, *, grace: float = 30) -> list[int]:
    """The marked processes still there after `grace` seconds (daemons being stopped take a moment)."""
    deadline = time.monotonic() + grace
    while (left := _processes_marked(run)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _live_replicas(server: ServerProcess, *, want: int = 2, timeout: float = 180) -> dict[str, int]:
    """Replica name -> pid, polled through the proxy until `want` distinct replicas have answered /health."""
    seen: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want:
        assert time.monotonic() < deadline, f"only {sorted(seen)} answered within {timeout:g} s: {server.output()}"
        response = httpx.get(f"{server.base}/health", timeout=30)
        assert response.status_code == 200
        seen[response.headers[REPLICA_HEADER]] = response.json()["pid"]
        time.sleep(0.05)
    return seen


def _complete(client, prompt: str) -> tuple[str, str]:
    """(the replica that answered, the completion's text); any error fails the calling test."""
    raw = client.completions.with_raw_response.create(model=client.model_name, prompt=prompt, max_tokens=TOKENS, temperature=0)
    return raw.headers[REPLICA_HEADER], raw.parse().choices[0].text


def _complete_all(client, prompts: list[str]) -> list[tuple[str, str]]:
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: _complete(client, p), prompts))


@pytest.fixture(scope="module")
def expected(generator):
    return {p: generator.generate(p, multi_exit=ACD, max_new_tokens=TOKENS).text for p in PROMPTS}


def test_each_replica_names_itself_and_its_own_process(ray_server):
    replicas = _live_replicas(ray_server)
    assert len(set(replicas.values())) == 2 and os.getpid() not in replicas.values()
    assert all(name.startswith("autocontrast#") for name in replicas)


def test_concurrent_completions_are_served_by_both_replicas_and_equal_the_generator(ray_server, client,
                                                                                      expected):
    answers = _complete_all(client, PROMPTS + PROMPTS)  # 16 at once: the router spreads them by load
    assert [text for _, text in answers] == [expected[p] for p in PROMPTS + PROMPTS]
    assert {replica for replica, _ in answers} == set(_live_replicas(ray_server))


def test_streamed_chat_through_the_proxy_equals_the_generator(client, generator):
    messages = [{"role": "user", "content": PROMPTS[1]}]
    with client.chat.completions.with_streaming_response.create(model=client.model_name, messages=messages, max_tokens=TOKENS,
                                                                temperature=0, stream=True) as raw:
        assert raw.headers[REPLICA_HEADER].startswith("autocontrast#")
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == generator.generate(PROMPTS[1], multi_exit=ACD, max_new_tokens=TOKENS, chat=True).text


def test_a_killed_replica_is_replaced_and_every_later_request_succeeds(ray_server, client, expected):
    """SIGKILL one idle replica's process, then send 4 requests at a time until its replacement has
    answered: every one of them must succeed (Serve routes around the dead replica while it starts
    a new one), none may come from the dead one, and all equal the generator's text."""
    before = _live_replicas(ray_server)
    victim, pid = sorted(before.items())[0]
    os.kill(pid, signal.SIGKILL)
    answers: list[tuple[str, str]] = []
    deadline = time.monotonic() + 240
    while not {replica for replica, _ in answers} - set(before):
        assert time.monotonic() < deadline, f"no replacement answered within 240 s: {ray_server.output()}"
        answers += _complete_all(client, PROMPTS[:4])
    assert victim not in {replica for replica, _ in answers}
    assert [text for _, text in answers] == [expected[p] for p in PROMPTS[:4]] * (len(answers) // 4)
    after = _live_replicas(ray_server)
    assert victim not in after and pid not in after.values() and set(before) - {victim} <= set(after)


def test_sigterm_stops_serve_and_every_process_of_the_local_cluster(ray_server):
    started = _processes_marked(ray_server.run)
    assert len(started) > 4  # the server, Ray's daemons, the controller, the proxy, the replicas
    ray_server.stop(timeout=120)
    assert ray_server.proc.returncode == 0, ray_server.output()
    assert "acd-serve: stopped" in ray_server.output()
    assert _left_running(ray_server.run) == []


def test_replicas_that_cannot_fit_the_local_cluster_exit_2_and_leave_nothing_running(llama_bundle):
    temp_dir, run = tempfile.mkdtemp(prefix="acd-ray-", dir="/tmp"), uuid.uuid4().hex
    too_many = str(os.cpu_count() + 1)
    try:
        done = subprocess.run([sys.executable, "-m", "autocontrast.serve.cli", str(llama_bundle), "--ray",
                               "--replicas", too_many, "--replica-cpus", "1", "--ray-temp-dir", temp_dir],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, MARK: run, "RAY_USAGE_STATS_ENABLED": "0"})
        assert done.returncode == 2, done.stderr
        assert f"{too_many} replica(s) of 1 CPU need {too_many} CPUs" in done.stderr
        assert "Traceback" not in done.stderr
        assert _left_running(run) == []
    finally:
        for pid in _processes_marked(run):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _readme_serve_config(*, bundle: Path, port: int) -> dict:
    """The README's KubeRay RayService example's serveConfigV2, with this bundle and a loopback port."""
    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    head = "```yaml\napiVersion: ray.io/v1\n"
    service = yaml.safe_load(head[len("```yaml\n"):] + readme.split(head, 1)[1].split("```", 1)[0])
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"]["bundle"] = str(bundle)
    return config


def test_the_rayservice_examples_serve_config_runs_under_serve_run(llama_bundle, expected, tmp_path):
    port, temp_dir, run = free_port(), tempfile.mkdtemp(prefix="acd-ray-", dir="/tmp"), uuid.uuid4().hex
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps(_readme_serve_config(bundle=llama_bundle, port=port)))  # JSON is YAML
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-c", "from ray.serve.scripts import cli; cli()", "run", str(config)],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, MARK: run, "RAY_TMPDIR": temp_dir, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        deadline, answer = time.monotonic() + 300, None
        while answer is None or answer.status_code != 200:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(1)
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                    json={"prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0})
        assert answer.json()["choices"][0]["text"] == expected[PROMPTS[0]]
        assert answer.headers[REPLICA_HEADER].startswith("autocontrast#")
        proc.send_signal(signal.SIGINT)  # `serve run` shuts Serve and its local cluster down on Ctrl-C
        proc.wait(timeout=120)
        assert _left_running(run) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _processes_marked(run):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
