"""``GET /`` (the web page) and ``GET /static/{name}`` (its script and style sheet) from ``service/static``;
``GET /docs`` (Swagger UI) with its assets under ``/docs/assets/``.

The page is plain HTML, CSS and one JavaScript module: no build step and nothing fetched from the
network. So is ``/docs``: Swagger UI's script and style sheet come from the ``swagger-ui-bundle-v2``
package (Swagger UI 5, which reads the OpenAPI 3.1 schema FastAPI writes) and are served from here,
not from a CDN, so the page works offline; its validator badge (a call to swagger.io) is off. These
routes need no API key (the page holds no data); the calls the page makes send the key the user
entered.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse

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


# The Swagger UI files /docs names, and their types: nothing else of the package is served.
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
DOCS_ASSET_URL = "/docs/assets/{name}"


def swagger_ui_dir() -> Path:
    """The folder of Swagger UI's distribution files in the installed ``swagger-ui-bundle-v2``."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError as exc:
        raise APIError(
            503, "the API docs need swagger-ui-bundle-v2: pip install swagger-ui-bundle-v2", "unavailable"
        ) from exc
    return Path(swagger_ui_path)


@router.get("/docs", include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    from fastapi.openapi.docs import get_swagger_ui_html

    swagger_ui_dir()  # 503 with an install hint rather than a page whose assets 404
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=root + request.app.openapi_url,
        title=f"{request.app.title} - API docs",
        swagger_js_url=root + DOCS_ASSET_URL.format(name="swagger-ui-bundle.js"),
        swagger_css_url=root + DOCS_ASSET_URL.format(name="swagger-ui.css"),
        swagger_favicon_url=root + DOCS_ASSET_URL.format(name="favicon-32x32.png"),
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/docs/assets/{name}", include_in_schema=False)
def docs_asset(name: str) -> FileResponse:
    media_type = DOCS_ASSETS.get(name)  # a fixed list: no path from the request reaches the file system
    if media_type is None:
        raise APIError(404, f"no docs asset {name!r}")
    # the files change only with the package version: a day of caching, revalidated by ETag after
    headers = {"Cache-Control": "max-age=86400", "X-Content-Type-Options": "nosniff"}
    return FileResponse(swagger_ui_dir() / name, media_type=media_type, headers=headers)
