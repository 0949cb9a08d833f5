"""Run clients/locustfile.py headless for a bounded time and summarise its CSV (the HTML report sits beside it)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .load_config import LoadConfig

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+s)?$")


@dataclass(frozen=True)
class LoadTestRun:
    """One headless locust run."""

    host: str
    """Base URL of the service."""
    out: Path
    """Folder of the CSV files (locust_stats.csv, ...) and report.html."""
    users: int = 32
    """Concurrent simulated users."""
    spawn_rate: float = 8.0
    """Users started per second until all run."""
    duration: str = "3m"
    """Run time in locust's syntax: 20s, 3m, 1h30m."""
    stop_timeout_s: int = 120
    """At the end, how long users may finish their request in flight (so no request is cut off and miscounted)."""
    load: LoadConfig = field(default_factory=LoadConfig)
    """What the users send."""

    def __post_init__(self):
        if not self.duration or not _DURATION.match(self.duration):
            raise ValueError(f"duration {self.duration!r}: expected e.g. 20s, 3m, 1h30m")
        if self.users < 1 or self.spawn_rate <= 0:
            raise ValueError("users must be >= 1 and spawn_rate > 0")

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--only-summary",
            "--users",
            str(self.users),
            "--spawn-rate",
            str(self.spawn_rate),
            "--run-time",
            self.duration,
            "--stop-timeout",
            str(self.stop_timeout_s),
            "--host",
            self.host,
            "--csv",
            str(self.out / "locust"),
            "--html",
            str(self.out / "report.html"),
        ]


@dataclass(frozen=True)
class EndpointStats:
    """One row of locust_stats.csv (times in ms)."""

    name: str
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float


def read_stats(out: Path) -> list[EndpointStats]:
    """The per-request-name rows of a finished run, the `Aggregated` row last."""
    with open(out / "locust_stats.csv", newline="") as f:
        return [
            EndpointStats(
                name=row["Name"],
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                requests_per_s=float(row["Requests/s"]),
                p50_ms=float(row["50%"] or 0),
                p99_ms=float(row["99%"] or 0),
            )
            for row in csv.DictReader(f)
        ]


def summary(stats: list[EndpointStats]) -> str:
    lines = [f"{'name':<22}{'requests':>9}{'failures':>9}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"]
    lines += [
        f"{s.name:<22}{s.requests:>9}{s.failures:>9}{s.requests_per_s:>8.2f}{s.p50_ms:>9.0f}{s.p99_ms:>9.0f}"
        for s in stats
    ]
    return "\n".join(lines)


def run_loadtest(run: LoadTestRun) -> int:
    """Runs locust to the end; returns its exit code (non-zero when any request failed)."""
    run.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **run.load.to_env()}
    return subprocess.call(run.command(), env=env)
