"""A local sae-serve for benchmarks: private Ray on 127.0.0.1 with the Ray Serve app, torn down on exit."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def running_service(config: dict[str, Any]) -> Iterator[str]:
    """Base URL of the service built from `config` (a ServiceConfig mapping; its port is chosen here)."""
    import ray
    from ray import serve

    from serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({**config, "port": port}), name="sae-serve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
