"""The SAE registry folder as the service sees it: which SAEs it holds, where an admin path points, and the
card / feature statistics the trainer writes beside the weights (see trainer/publish.py and trainer/card.py).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("sae_serve")

MANIFEST = "manifest.json"
CARD_FILE = "card.json"
FEATURE_STATS_FILE = "feature_stats.json"
SAE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_sae_id(sae_id: str) -> str | None:
    """An error message for an id that cannot be served (it appears in URLs and metric labels), else None."""
    if SAE_ID.fullmatch(sae_id):
        return None
    return (
        f"invalid SAE id {sae_id!r}: use up to 128 letters, digits, '.', '_' and '-', starting with a letter or digit"
    )


@dataclass(frozen=True)
class Published:
    """One manifest entry: where the SAE lies and which publish of that id it is (1, 2, ...)."""

    folder: Path
    version: int


def published(registry: Path) -> dict[str, Published]:
    """The manifest's entries (the trainer's publish writes it atomically); {} when there is no manifest."""
    manifest = registry / MANIFEST
    if not manifest.is_file():
        return {}
    entries = json.loads(manifest.read_text()).get("saes", {})
    return {
        sae_id: Published(registry / entry["path"], int(entry.get("version", 1)))
        for sae_id, entry in sorted(entries.items())
    }


def scan(registry: Path) -> dict[str, Path]:
    """SAE id -> folder: the manifest's entries if the trainer published one, else every SAE-looking subfolder."""
    from sae import detect_format

    if (registry / MANIFEST).is_file():
        return {sae_id: entry.folder for sae_id, entry in published(registry).items()}
    found: dict[str, Path] = {}
    for sub in sorted(registry.iterdir()) if registry.is_dir() else ():
        if not sub.is_dir() or sub.name.startswith(".") or check_sae_id(sub.name):
            continue
        try:
            detect_format(sub)
        except ValueError:
            continue
        found[sub.name] = sub
    return found


def resolve(registry: Path | None, path: str) -> Path:
    """The folder an admin request names; ValueError unless it lies inside the registry."""
    if registry is None:
        raise ValueError("no sae_registry is configured, so no SAE can be loaded at run time")
    try:
        candidate = Path(path).expanduser()
    except RuntimeError:  # "~user/..." of a user this machine does not know
        raise ValueError(f"path {path!r} names the home folder of an unknown user") from None
    target = (candidate if candidate.is_absolute() else registry / candidate).resolve()
    if target != registry and registry not in target.parents:
        raise ValueError(f"path {path!r} is outside the SAE registry")
    if not target.is_dir():
        raise ValueError(f"path {path!r} is not a folder in the SAE registry")
    return target


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file beside the weights, or None if absent or unreadable (a broken card must not hide the SAE)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("cannot read %s: %s", path, e)
        return None
