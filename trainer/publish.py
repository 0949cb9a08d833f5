"""Publishing into the SAE registry, the folder the service watches.

Layout:
    <registry>/manifest.json          {"format": "sae-serve-registry/1", "updated_at", "saes": {<sae_id>: entry}}
    <registry>/<sae_id>/v<N>/sae.json, sae.safetensors, card.json, feature_stats.json, *.png, metrics.jsonl
where entry = {"version": N (1, 2, ... per id), "path": "<sae_id>/v<N>", "sha256": of sae.safetensors,
"published_at", "hook_point", "architecture", "d_sae", "model"}.

Each publish gets a folder of its own, so a service that rejects a new version keeps serving the previous one
from files that did not change under it; the last KEEP_VERSIONS versions of an id are kept. An SAE folder is
copied to a hidden temporary sibling and renamed into place; the manifest is rewritten through a temporary file
and `os.replace` after that, so a reader that trusts the manifest only ever sees complete SAEs. Publishers
serialise on an `flock` of `<registry>/.lock`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sae import load_sae

MANIFEST = "manifest.json"
FORMAT = "sae-serve-registry/1"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
KEEP_VERSIONS = 3  # a rejected publish or two must leave the version replicas still serve in place


def read_manifest(registry: str | Path) -> dict[str, Any]:
    """The registry manifest (an empty one if the registry is new)."""
    path = Path(registry) / MANIFEST
    if not path.exists():
        return {"format": FORMAT, "updated_at": None, "saes": {}}
    return json.loads(path.read_text())


@contextmanager
def _locked(registry: Path) -> Iterator[None]:
    with open(registry / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def publish(folder: str | Path, registry: str | Path, sae_id: str) -> dict[str, Any]:
    """Copy a finished SAE folder into the registry as `sae_id` (next version) and return its manifest entry.

    The folder must load with `sae.load_sae`; a bad SAE is rejected before anything in the registry changes.
    """
    if not _ID.fullmatch(sae_id):
        raise ValueError(f"invalid SAE id {sae_id!r}: use letters, digits, '.', '_' and '-'")
    folder, registry = Path(folder), Path(registry)
    sae = load_sae(folder)
    registry.mkdir(parents=True, exist_ok=True)
    with _locked(registry):
        manifest = read_manifest(registry)
        version = manifest["saes"].get(sae_id, {}).get("version", 0) + 1
        tag = uuid.uuid4().hex[:12]
        home = registry / sae_id
        home.mkdir(exist_ok=True)
        staging = home / f".v{version}.tmp-{tag}"
        shutil.copytree(folder, staging)
        target = home / f"v{version}"
        if target.exists():  # left by a publish whose manifest write never happened
            shutil.rmtree(target)
        os.rename(staging, target)
        entry = {
            "version": version,
            "path": f"{sae_id}/v{version}",
            "sha256": _sha256(target / "sae.safetensors"),
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "hook_point": sae.cfg.hook_point,
            "architecture": sae.cfg.architecture,
            "d_sae": sae.cfg.d_sae,
            "model": sae.cfg.model,
        }
        manifest["saes"][sae_id] = entry
        manifest["updated_at"] = entry["published_at"]
        _write_json_atomic(registry / MANIFEST, manifest)
        for old in home.iterdir():
            if (
                old.is_dir()
                and old.name.startswith("v")
                and old.name[1:].isdigit()
                and int(old.name[1:]) <= version - KEEP_VERSIONS
            ):
                shutil.rmtree(old, ignore_errors=True)
    return entry
