"""The set of SAEs every model replica should serve: one small Ray Serve deployment all replicas converge to.

A handle call reaches one replica only, so an admin load is validated and applied by one replica, recorded here,
and picked up by the others (at once for requests that carry the newer version, else within a sync interval).
New and restarted replicas load the current set at start. Each entry carries the version at which it was put, so
re-loading the same id from the same folder (new weights) reaches every replica too.

Registry publishes (the trainer's manifest versions) are claimed here, so that of all the replicas watching the
registry exactly one validates and loads each publish; the others follow through the directory as for an admin load.
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

    def __init__(self, initial: dict[str, str], published: dict[str, int] | None = None):
        self._version = 1
        self._saes = {sae_id: (path, 1) for sae_id, path in initial.items()}
        self._claims = dict(published or {})  # sae id -> newest registry publish version already handled
        self._errors: dict[str, str] = {}  # sae id -> why its last load failed

    def claim(self, sae_id: str, publish_version: int) -> bool:
        """True for the first replica to ask about this publish of `sae_id`: that one loads it."""
        if publish_version <= self._claims.get(sae_id, 0):
            return False
        self._claims[sae_id] = publish_version
        return True

    def release(self, sae_id: str, publish_version: int) -> None:
        """Give back a claim whose load neither succeeded nor was rejected, so that another replica may take it."""
        if self._claims.get(sae_id) == publish_version:
            self._claims[sae_id] = publish_version - 1

    def reject(self, sae_id: str, error: str) -> None:
        self._errors[sae_id] = error

    def errors(self) -> dict[str, str]:
        return dict(self._errors)

    def snapshot(self) -> SAESnapshot:
        return SAESnapshot(self._version, dict(self._saes))

    def put(self, sae_id: str, path: str) -> int:
        self._version += 1
        self._saes[sae_id] = (path, self._version)
        self._errors.pop(sae_id, None)
        return self._version

    def remove(self, sae_id: str) -> int:
        if self._saes.pop(sae_id, None) is not None:
            self._version += 1
        return self._version
