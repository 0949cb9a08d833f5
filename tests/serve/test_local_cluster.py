"""The local cluster sae-serve starts itself (serve/launch/local_cluster.py): direct ingress on the configured port,
and the start refusals that come before Ray does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from serve.config import ServiceConfig
from serve.launch.local_cluster import check_direct_ingress, check_port_free, direct_ingress_env

REPO = Path(__file__).resolve().parents[2]


def listener_of(port: int) -> psutil.Process:
    (conn,) = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    return psutil.Process(conn.pid)


def test_the_ingress_replica_itself_listens_on_the_configured_port(service):
    port = int(service.base_url.rsplit(":", 1)[1])
    # Ray names a replica's process after its deployment; Ray's proxy process would be "ray::ProxyActor".
    assert "SAEServeIngress" in " ".join(listener_of(port).cmdline())
    with service.http() as http:
        assert http.get("/v1/models").status_code == 200


def test_direct_ingress_settings_name_exactly_the_configured_port():
    env = direct_ingress_env(8123)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Ray allocates from range(min, max): one port, the configured one.
    assert range(
        int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    ) == range(8123, 8124)


def test_several_ingress_replicas_need_the_proxy():
    several = {"ingress": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}}
    with pytest.raises(ValueError, match="direct_ingress: false"):
        check_direct_ingress(ServiceConfig.model_validate(several))
    check_direct_ingress(ServiceConfig.model_validate({**several, "direct_ingress": False}))
    check_direct_ingress(ServiceConfig())


def test_a_busy_port_is_refused_before_ray_starts():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
        r = subprocess.run(
            [sys.executable, "-m", "serve.launch.cli", "up", "--port", str(port)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "SAE_SERVE_API_KEYS": ""},
        )
    assert r.returncode == 2, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Started a local Ray" not in r.stderr
