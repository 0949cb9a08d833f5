"""The instructions of deploy/docker/Dockerfile.* as (instruction, arguments) pairs, continuation lines joined."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from tests.deploy.k8s_manifests import DEPLOY

DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu", "gpu": DEPLOY / "docker" / "Dockerfile.gpu"}


def instructions(path: Path) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", path.read_text())
    lines = (line.strip() for line in joined.splitlines())
    return [
        (op.upper(), rest.strip())
        for op, _, rest in (line.partition(" ") for line in lines if line and not line.startswith("#"))
    ]


def args_of(path: Path) -> dict[str, str]:
    """ARG name -> default value."""
    return dict(rest.split("=", 1) for op, rest in instructions(path) if op == "ARG" and "=" in rest)


def env_of(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in instructions(path):
        if op == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def copy_sources(path: Path) -> list[str]:
    """Build-context paths of the COPY instructions (flags such as --chown left out)."""
    sources = []
    for op, rest in instructions(path):
        if op == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def pip_extras(path: Path) -> list[str]:
    """The extras of every `pip install ".[a,b]"` of the project."""
    return [
        extra
        for op, rest in instructions(path)
        if op == "RUN"
        for group in re.findall(r"\"\.\[([^\]]+)\]\"", rest)
        for extra in group.split(",")
    ]
