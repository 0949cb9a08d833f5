"""The feature explorer's static page (serve/web: plain HTML, CSS and ES modules, no build step) at /ui/.

The page itself needs no key: it holds no data and calls the /v1 API with the key its user types in.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from serve.errors import NotFound

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
ASSET_NAME = re.compile(r"[A-Za-z0-9_-]+\.(html|js|css)")
MEDIA_TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css"}
# The page loads only its own files and talks only to this origin; blob: is for plots fetched with the key.
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui")
async def ui_no_slash() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui/{name}")
async def ui_asset(name: str) -> FileResponse:
    match = ASSET_NAME.fullmatch(name)
    if match is None or not (WEB_DIR / name).is_file():
        raise NotFound(f"no such page asset: {name!r}", code="not_found")
    return FileResponse(WEB_DIR / name, media_type=MEDIA_TYPES[match.group(1)], headers=HEADERS)


@router.get("/ui/")
async def ui_index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=HEADERS)
