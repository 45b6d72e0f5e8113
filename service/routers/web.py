"""``GET /`` (the web page) and ``GET /static/{name}`` (its script and style sheet) from ``service/static``.

The page is plain HTML, CSS and one JavaScript module: no build step and nothing fetched from the
network. These routes need no API key (the page holds no data); the calls the page makes send the key
the user entered.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import APIError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
NAME = re.compile(r"[A-Za-z0-9_-]+\.[a-z]+")  # a flat folder: no separators, so no path can leave it
# The page's assets change together with the page: the browser revalidates (ETag) instead of mixing versions.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(tags=["web"])


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/static/{name}", include_in_schema=False)
def static(name: str) -> FileResponse:
    path = STATIC_DIR / name
    if not NAME.fullmatch(name) or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise APIError(404, f"no static file {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)
