"""Replicas of the OpenAI app on a Ray cluster (Ray Serve): `acd-serve BUNDLE --ray --replicas N`.

Each replica is one Ray actor that builds its own `Generator`, scheduler and app from an `AppSpec`
(so one replica is exactly the single-process server); Serve's proxy spreads requests over the
replicas, replaces a replica whose process dies and, with min/max replicas, autoscales on the
number of ongoing requests. Every response names the replica that served it in `x-acd-replica`.
Ray is imported only here and only when asked for (`pip install "autocontrast[cluster]"`).

>>> scaling = RayScaling(replicas=2, replica_cpus=1)
>>> serve_on_ray(AppSpec("/models/smollm2-acd", config), scaling, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import threading
from typing import Any

from autocontrast.errors import ClusterError, ConfigurationError
from autocontrast.serve.address import listening_socket
from autocontrast.serve.app import AppSpec, build_app

log = logging.getLogger("autocontrast.serve")

REPLICA_HEADER = "x-acd-replica"
APP_NAME = "autocontrast"  # the Serve application (and its deployment) on the cluster


@dataclasses.dataclass(frozen=True)
class RayScaling:
    """How many replicas, each reserving `replica_cpus` of Ray's CPUs (and one GPU off the CPU provider).

    A fixed count (`replicas`), or autoscaling between `min_replicas` and `max_replicas` (then
    `replicas`, if given, is the count to start with).
    """

    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    replica_cpus: float = 1.0

    def __post_init__(self) -> None:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigurationError("--min-replicas and --max-replicas go together: give both, or neither "
                                     "(and --replicas N for a fixed count)")
        if self.replicas is not None and self.replicas < 1:
            raise ConfigurationError(f"--replicas ({self.replicas}) must be >= 1")
        if self.autoscaling and not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas == 0:
            raise ConfigurationError(f"--min-replicas ({self.min_replicas}) and --max-replicas "
                                     f"({self.max_replicas}) need 0 <= min <= max and max >= 1")
        if self.autoscaling and self.replicas is not None and not (
                self.min_replicas <= self.replicas <= self.max_replicas):
            raise ConfigurationError(f"--replicas ({self.replicas}) must lie within --min-replicas "
                                     f"({self.min_replicas}) and --max-replicas ({self.max_replicas})")
        if not (math.isfinite(self.replica_cpus) and self.replica_cpus >= 0):
            raise ConfigurationError(f"--replica-cpus ({self.replica_cpus}) must be a number >= 0")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def most_replicas(self) -> int:
        return self.max_replicas if self.autoscaling else self.replicas or 1

    def deployment_options(self, spec: AppSpec, *, drain_timeout: float) -> dict[str, Any]:
        """`serve.deployment` options: replica count or autoscaling, resources, limits, drain."""
        config = spec.config
        options: dict[str, Any] = dict(
            name=APP_NAME,
            ray_actor_options={"num_cpus": self.replica_cpus, "num_gpus": 0 if spec.provider == "cpu" else 1},
            # the replica's own limits answer beyond this (429), as the single-process server does
            max_ongoing_requests=config.max_batch + config.max_queue,
            graceful_shutdown_timeout_s=drain_timeout,  # a stopping replica finishes its requests
        )
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": self.replicas,
                "target_ongoing_requests": config.max_batch}  # a full batch per replica: add one
        else:
            options["num_replicas"] = self.replicas or 1
        return options


class ReplicaHeader:
    """ASGI middleware: every HTTP response carries `x-acd-replica: <name>` (errors too)."""

    def __init__(self, app: Any, name: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), name.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan passes through untouched
            return

        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


class OpenAIReplica:
    """One Serve replica: its own Generator, scheduler and OpenAI app (the app's lifespan, run by
    Serve in the replica, starts and drains the scheduler); Serve's health check asks whether the
    scheduler thread is alive."""

    def __init__(self, spec: AppSpec) -> None:
        from ray import serve

        context = serve.get_replica_context()
        self.replica_name = f"{context.deployment}#{context.replica_id.unique_id}"
        self.openai_app = build_app(spec)  # not `app`: Serve's wrapper has that property

    def __serve_build_asgi_app__(self) -> Any:  # called by Serve once __init__ has returned
        return ReplicaHeader(self.openai_app, self.replica_name)

    def check_health(self) -> None:
        if not self.openai_app.state.scheduler.alive:
            raise RuntimeError(f"replica {self.replica_name}: the scheduler thread has stopped")


def application(spec: AppSpec, scaling: RayScaling, *, drain_timeout: float = 60.0) -> Any:
    """The Serve application (a bound deployment of `OpenAIReplica`) to pass to `serve.run`."""
    from ray import serve

    ingress = serve.ingress()(OpenAIReplica)  # no app given: Serve calls __serve_build_asgi_app__
    return serve.deployment(ingress, **scaling.deployment_options(spec, drain_timeout=drain_timeout)).bind(spec)


def serve_on_ray(spec: AppSpec, scaling: RayScaling, *, host: str, port: int, address: str | None = None,
                 temp_dir: str | None = None, drain_timeout: float = 60.0, banner: str = "") -> None:
    """Run the replicas on a new local Ray cluster (`address` None) or on the cluster at `address`,
    serving HTTP on host:port until SIGINT or SIGTERM; then remove them (and the local cluster)."""
    ray, serve = _import_ray()
    local = address is None
    if local:  # the proxy binds host:port on this machine: a taken port fails now, not after Ray started
        listening_socket(host, port).close()
    try:
        if local:  # a cluster of our own, gone with ray.shutdown(); never an existing one by accident
            ray.init(address="local", include_dashboard=False, _temp_dir=temp_dir)
        else:
            ray.init(address=address)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise ClusterError(f"cannot {'start a local Ray cluster' if local else f'reach the Ray cluster at {address!r}'}"
                           f": {err}") from None
    try:
        _check_fits(ray, scaling, local=local)
        try:
            serve.start(http_options={"host": host, "port": port})
        except RuntimeError as err:  # the proxy could not bind host:port (taken since acd-serve checked it)
            raise ClusterError(f"Ray Serve could not serve HTTP on {host}:{port}: {_cause(err)}") from None
        try:
            serve.run(application(spec, scaling, drain_timeout=drain_timeout), name=APP_NAME, route_prefix="/")
        except RuntimeError as err:  # Serve gave up starting the replicas (their logs say why)
            raise ClusterError(f"the replicas did not start: {err}") from None
        print(f"{banner} as {_describe(scaling)} on Ray Serve ({'a local Ray cluster' if local else address}) "
              f"at http://{host}:{port}/v1", file=sys.stderr, flush=True)
        _wait_for_signal()
        print("acd-serve: stopping the replicas (running requests finish first)", file=sys.stderr, flush=True)
    finally:
        with _quiet_failure():
            serve.shutdown() if local else serve.delete(APP_NAME)  # never other apps on a shared cluster
        ray.shutdown()


def _import_ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise ConfigurationError(f"--ray needs the cluster extra ({err.name} is missing): "
                                 "pip install 'autocontrast[cluster]'") from None
    return ray, serve


def _cause(err: BaseException) -> str:
    """The last line of a (possibly remote) error: Ray's own wrap a whole remote traceback."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def _check_fits(ray: Any, scaling: RayScaling, *, local: bool) -> None:
    """On the local cluster, replicas that can never be placed are a mistake, not a wait forever."""
    have = ray.cluster_resources().get("CPU", 0)
    need = scaling.most_replicas * scaling.replica_cpus
    if local and need > have:
        raise ClusterError(f"{scaling.most_replicas} replica(s) of {scaling.replica_cpus:g} CPU need {need:g} "
                           f"CPUs; this machine's Ray node has {have:g}: lower --replica-cpus (e.g. "
                           f"{have / scaling.most_replicas:g}) or the replica count")


def _describe(scaling: RayScaling) -> str:
    if scaling.autoscaling:
        return f"{scaling.min_replicas}..{scaling.max_replicas} autoscaled replicas"
    return f"{scaling.replicas or 1} replica(s)"


def _wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


@contextlib.contextmanager
def _quiet_failure() -> Any:
    """Shutting down must not hide the error that led to it (Serve may already be gone)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - logged; the cluster is shut down next regardless
        log.warning("while stopping Serve: %s", err)

