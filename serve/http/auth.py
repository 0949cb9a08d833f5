"""API keys: read once from files / env vars, kept only as sha256 digests, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from serve.config import AuthConfig

Scope = Literal["user", "admin"]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _read_keys(file: Path | None, env: str) -> list[str]:
    keys: list[str] = []
    if file is not None:
        for line in Path(file).expanduser().read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    keys += [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    return keys


@dataclass(frozen=True)
class KeyStore:
    """Digests of user and admin keys; admin keys are valid user keys too. Empty: auth is off."""

    user: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def from_config(cls, cfg: AuthConfig) -> KeyStore:
        admin = tuple(_digest(k) for k in _read_keys(cfg.admin_keys_file, cfg.admin_keys_env))
        user = tuple(_digest(k) for k in _read_keys(cfg.api_keys_file, cfg.api_keys_env))
        return cls(user=user + admin, admin=admin)

    @property
    def enabled(self) -> bool:
        return bool(self.user)

    def scope_of(self, key: str) -> Scope | None:
        """The scope a presented key grants, or None. Every digest is compared, so timing says nothing."""
        d = _digest(key)
        is_user = False
        is_admin = False
        for known in self.user:
            is_user |= hmac.compare_digest(d, known)
        for known in self.admin:
            is_admin |= hmac.compare_digest(d, known)
        if is_admin:
            return "admin"
        return "user" if is_user else None
