"""The set of SAEs every model replica should serve: one small Ray Serve deployment all replicas converge to.

A handle call reaches one replica only, so an admin load is validated and applied by one replica, recorded here,
and picked up by the others (at once for requests that carry the newer version, else within a sync interval).
New and restarted replicas load the current set at start. Each entry carries the version at which it was put, so
re-loading the same id from the same folder (new weights) reaches every replica too.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SAESnapshot:
    """Directory version and, per SAE id, (folder, version at which it was last put)."""

    version: int
    saes: dict[str, tuple[str, int]] = field(default_factory=dict)


class SAEDirectory:
    """Desired SAE set; plain methods (Ray Serve runs them one at a time per replica, and there is one replica)."""

    def __init__(self, initial: dict[str, str]):
        self._version = 1
        self._saes = {sae_id: (path, 1) for sae_id, path in initial.items()}

    def snapshot(self) -> SAESnapshot:
        return SAESnapshot(self._version, dict(self._saes))

    def put(self, sae_id: str, path: str) -> int:
        self._version += 1
        self._saes[sae_id] = (path, self._version)
        return self._version

    def remove(self, sae_id: str) -> int:
        if self._saes.pop(sae_id, None) is not None:
            self._version += 1
        return self._version
