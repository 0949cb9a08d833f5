"""`python -m trainer --config X.yaml [--set key.path=value ...]` — works directly and under `ray job submit`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import load_config
from .job import run_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train, evaluate and publish an SAE on Ray.")
    parser.add_argument("--config", help="YAML config (trainer/configs/*.yaml); defaults apply without one")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.steps=100 (value parsed as YAML)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_job(load_config(args.config, args.overrides))
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
