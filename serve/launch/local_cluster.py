"""A private single-node Ray on this machine running the sae-serve app: `sae-serve up`, the test service, benchmarks.

With `ServiceConfig.direct_ingress` the ingress replica itself listens on host:port (Ray Serve direct ingress) and
Ray's proxy, which Ray still starts on the head node, gets a spare port on the same host. A streamed message then
crosses two processes (model replica -> ingress) instead of three, which is what keeps HTTP within 10% of the bare
engine on a 2-core machine (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from serve.config import ServiceConfig

APP_NAME = "sae-serve"


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve settings, read when Ray's processes start, that put the ingress replica on `port` itself."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive bound: exactly `port`
        # Quarantine and the 30 s drain exist for an external balancer (HAProxy) still routing to a leaving replica.
        # Nothing routes here but the one port, so a restarted ingress takes it back at once and a stop is quick.
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }


def _socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)


def check_port_free(host: str, port: int) -> None:
    """Fail before Ray starts, in plain words, when something already listens on host:port."""
    with _socket(host) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(
                f"cannot listen on {host}:{port}: {e.strerror} (is another service running there?)"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with _socket(host) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_direct_ingress(config: ServiceConfig) -> None:
    """One port fits one ingress replica: several need Ray's proxy in front of them."""
    ingress = config.ingress
    most = ingress.autoscaling.max_replicas if ingress.autoscaling is not None else ingress.num_replicas
    if config.direct_ingress and most > 1:
        raise ValueError(
            f"direct_ingress serves one port from one ingress replica, but the ingress may run {most}; "
            "set direct_ingress: false to put Ray's proxy in front of several"
        )


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_ray(config: ServiceConfig, num_cpus: int, log_to_driver: bool = True) -> Iterator[None]:
    """Ray bound to 127.0.0.1 with Serve's HTTP set up for `config`; Serve and Ray are shut down on exit."""
    import ray
    from ray import serve

    check_direct_ingress(config)
    check_port_free(config.host, config.port)
    env = direct_ingress_env(config.port) if config.direct_ingress else {}
    # Ray's processes copy the environment when they start, so the settings only need to hold across ray.init.
    with _environ(env):
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=num_cpus,
            log_to_driver=log_to_driver,
        )
    try:
        proxy_port = free_port(config.host) if config.direct_ingress else config.port
        serve.start(http_options={"host": config.host, "port": proxy_port})
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def running_service(config: ServiceConfig, num_cpus: int = 2, log_to_driver: bool = False) -> Iterator[str]:
    """The app running on a private local Ray; yields its base URL."""
    from ray import serve

    from serve.launch.app import build_app

    with local_ray(config, num_cpus, log_to_driver):
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        yield f"http://{config.host}:{config.port}"
