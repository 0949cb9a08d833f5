"""SIGTERM stops a benchmark the way Ctrl-C does, so that what it started (an engine, a local Ray) is stopped too."""

from __future__ import annotations

import signal
import sys


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit(143) in the main thread (SIGINT already raises KeyboardInterrupt): the benchmark's
    `finally` blocks and context managers run, shutting down its engine or service. Under the default action the
    process would vanish on the spot and leave them to the parent-death handling of `serve/engine/worker/lifetime.py`
    (vLLM's processes) and to Ray's own clean-up alone."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
