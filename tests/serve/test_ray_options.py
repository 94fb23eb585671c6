"""acd-serve --ray without a cluster: replica counts, Serve's deployment options, the replica header,
flag mistakes (exit 2), and that nothing but the --ray path imports Ray."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from autocontrast.cli_support import USAGE_ERROR, run_cli
from autocontrast.errors import ConfigurationError
from autocontrast.serve.app import AppSpec, ServerConfig
from autocontrast.serve.cli import main
from autocontrast.serve.ray_deployment import REPLICA_HEADER, RayScaling, ReplicaHeader

SPEC = AppSpec("/bundles/b", ServerConfig(model_name="b", max_batch=4, max_queue=12))


def test_a_fixed_count_becomes_num_replicas_with_the_cpus_each_reserves():
    options = RayScaling(replicas=3, replica_cpus=0.5).deployment_options(SPEC, drain_timeout=7)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}
    assert options["max_ongoing_requests"] == 4 + 12 and options["graceful_shutdown_timeout_s"] == 7


def test_min_and_max_autoscale_on_a_full_batch_per_replica():
    options = RayScaling(replicas=2, min_replicas=1, max_replicas=5).deployment_options(SPEC, drain_timeout=60)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 5, "initial_replicas": 2,
                                             "target_ongoing_requests": 4}


def test_a_gpu_provider_reserves_one_gpu_per_replica():
    spec = AppSpec("/bundles/b", SPEC.config, provider="cuda")
    assert RayScaling().deployment_options(spec, drain_timeout=1)["ray_actor_options"]["num_gpus"] == 1


@pytest.mark.parametrize("fields, says", [
    (dict(replicas=0), "--replicas (0) must be >= 1"),
    (dict(min_replicas=1), "go together"),
    (dict(min_replicas=3, max_replicas=2), "0 <= min <= max"),
    (dict(min_replicas=0, max_replicas=0), "max >= 1"),
    (dict(replicas=9, min_replicas=1, max_replicas=4), "must lie within"),
    (dict(replica_cpus=-1), "--replica-cpus (-1)"),
    (dict(replica_cpus=float("nan")), "--replica-cpus (nan)"),
])
def test_impossible_replica_counts_are_configuration_errors(fields, says):
    with pytest.raises(ConfigurationError, match=re.escape(says)):
        RayScaling(**fields)


def _app() -> Starlette:
    async def ok(request):
        return PlainTextResponse("ok")

    async def boom(request):
        raise RuntimeError("boom")

    return Starlette(routes=[Route("/ok", ok), Route("/boom", boom)])


def test_every_response_names_the_replica_errors_included():
    with TestClient(ReplicaHeader(_app(), "autocontrast#abc"), raise_server_exceptions=False) as http:
        ok, boom = http.get("/ok"), http.get("/boom")
    assert (ok.status_code, ok.text, ok.headers[REPLICA_HEADER]) == (200, "ok", "autocontrast#abc")
    assert (boom.status_code, boom.headers[REPLICA_HEADER]) == (500, "autocontrast#abc")


@pytest.mark.parametrize("flags", [["--replicas", "2"], ["--ray-address", "auto"], ["--min-replicas", "1"]])
def test_ray_flags_without_ray_exit_2(flags, capsys):
    assert run_cli(main, ["/no/such/bundle", *flags]) == USAGE_ERROR
    assert "only apply with --ray" in capsys.readouterr().err


def test_ray_missing_says_which_extra_to_install(llama_bundle, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    assert run_cli(main, [str(llama_bundle), "--ray", "--replicas", "2"]) == USAGE_ERROR
    assert "pip install 'autocontrast[cluster]'" in capsys.readouterr().err


def test_the_plain_server_and_the_replica_module_do_not_import_ray():
    code = ("import sys, autocontrast.serve.cli, autocontrast.serve.app, autocontrast.serve.ray_deployment; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("ray", [False, True])
def test_a_taken_port_exits_2_naming_it_before_any_model_or_cluster_starts(llama_bundle, ray, capsys):
    if ray:
        pytest.importorskip("ray.serve")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        assert run_cli(main, [str(llama_bundle), "--port", str(port), *(["--ray"] if ray else [])]) == USAGE_ERROR
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert time.monotonic() - started < 10  # neither the model nor a Ray cluster was started


def test_an_unknown_host_exits_2(llama_bundle, capsys):
    assert run_cli(main, [str(llama_bundle), "--host", "no-such-host.invalid"]) == USAGE_ERROR
    assert "is not an address of this machine" in capsys.readouterr().err


def test_a_negative_kv_reserve_is_a_usage_error(llama_bundle, capsys):
    assert run_cli(main, [str(llama_bundle), "--kv-reserve-mb", "-1"]) == USAGE_ERROR
    assert "--kv-reserve-mb (-1)" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match="kv_reserve_bytes"):
        ServerConfig(model_name="m", kv_reserve_bytes=-1)
