"""Route dependencies: the replica's context and API-key checks (401 without a valid key, 403 without admin)."""

from __future__ import annotations

from fastapi import Depends, Request

from serve.errors import AuthenticationFailed, PermissionDenied
from serve.http.context import IngressContext


def get_ctx(request: Request) -> IngressContext:
    return request.app.state.ctx


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_user(request: Request, ctx: IngressContext = Depends(get_ctx)) -> str | None:
    """The caller's scope ('user' / 'admin'), or None when auth is off."""
    if not ctx.keys.enabled:
        return None
    key = _presented_key(request)
    scope = ctx.keys.scope_of(key) if key else None
    if scope is None:
        message = "Incorrect API key provided." if key else "Missing API key: send `Authorization: Bearer <key>`."
        raise AuthenticationFailed(message, headers={"WWW-Authenticate": "Bearer"})
    return scope


def require_admin(scope: str | None = Depends(require_user)) -> None:
    if scope not in (None, "admin"):
        raise PermissionDenied("This operation needs an admin API key.")
