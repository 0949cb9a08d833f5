"""`sae-serve up`: a local single-node Ray bound to 127.0.0.1 (or an existing cluster) running the app until Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path

from serve.config import ServiceConfig
from serve.launch.local_cluster import APP_NAME


def service_config(path: Path, host: str | None, port: int | None) -> ServiceConfig:
    """The config file with command-line overrides; refuses an unauthenticated public bind before Ray starts."""
    from serve.http.auth import KeyStore
    from serve.launch.app import check_binding

    config = ServiceConfig.from_yaml(path)
    config = ServiceConfig.model_validate(
        {**config.model_dump(), **{k: v for k, v in (("host", host), ("port", port)) if v is not None}}
    )
    check_binding(config, KeyStore.from_config(config.auth), config.host, warn=False)  # build_app warns
    return config


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def up(config: ServiceConfig, address: str | None, num_cpus: int | None) -> int:
    import os

    if not address:
        # On Linux ray.init turns 127.0.0.1 into the machine's address unless Ray runs in its single-machine
        # mode (this switch); it must be set before ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from serve.launch.app import build_app
    from serve.launch.local_cluster import local_ray

    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if address:
            ray.init(address=address)
            stack.callback(ray.shutdown)
            stack.callback(serve.delete, APP_NAME)  # leave the rest of a shared cluster's Serve alone
            serve.start(http_options={"host": config.host, "port": config.port})
        else:
            try:
                stack.enter_context(local_ray(config, num_cpus or max(os.cpu_count() or 1, 2)))
            except ValueError as e:
                print(f"sae-serve up: error: {e}", file=sys.stderr)
                return 2
        # Ray's own SIGTERM handler ends the process mid-cleanup and orphans the local cluster's agents; a stop
        # request from a supervisor should take the same path as Ctrl-C.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            print(
                f"sae-serve: starting on http://{config.host}:{config.port} (the engine takes 1-3 minutes)...",
                file=sys.stderr,
            )
            ray_s = time.perf_counter() - started
            serve.run(build_app(config), name=APP_NAME, route_prefix="/")
            total_s = time.perf_counter() - started
            print(
                f"sae-serve: ready on http://{config.host}:{config.port} in {total_s:.0f} s (Ray {ray_s:.0f} s, "
                f"deployments and engine {total_s - ray_s:.0f} s; the replica's log line 'engine started' splits "
                f"the engine's part) (Ctrl-C stops)",
                file=sys.stderr,
            )
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            # make passes the SIGTERM it got on to us: a repeat must not cut the cleanup short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("sae-serve: stopping", file=sys.stderr)
    return 0
