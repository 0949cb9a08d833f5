"""metrics.jsonl: one JSON object per logged step, written by rank 0, trimmed back on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file ([] if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends step records; on resume, drops the records of steps the checkpoint does not contain."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Keep only records with record["step"] <= step (a resumed run re-does the later steps)."""
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        """Add one record and flush it, so a crash loses at most the line being written."""
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
