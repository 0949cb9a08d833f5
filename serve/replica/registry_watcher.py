"""Notices when the trainer publishes into the SAE registry: the manifest is replaced atomically on every publish
(trainer/publish.py), so one stat call per poll says whether anything changed."""

from __future__ import annotations

import logging
from pathlib import Path

from serve.registry import MANIFEST, Published, published

logger = logging.getLogger("sae_serve")


class ManifestWatcher:
    """`changed()` returns the manifest's entries when the file differs from the last look, else None."""

    def __init__(self, registry: Path):
        self._registry = registry
        self._stamp: tuple[int, int, int] | None = None

    def changed(self) -> dict[str, Published] | None:
        try:
            st = (self._registry / MANIFEST).stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return None
        self._stamp = stamp  # a broken manifest is reported once, not at every poll
        try:
            return published(self._registry)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.error("cannot read the SAE registry manifest %s: %s", self._registry / MANIFEST, e)
            return None
