"""A running ``mm serve`` found from its collection folder, so that ``mm search`` skips loading the model.

``mm serve`` announces itself in ``<collection>/serve.json`` (written atomically once it answers, removed
when it exits): ``{"pid", "host", "port", "url", "started", "instance", "model", "adapter",
"collection"}``; never an API key. ``instance`` is a random token the server also sends as the
``X-MM-Instance`` header of ``GET /health``, which proves that whatever answers on that port is the server
that wrote the file, for this collection (a port reused by another process, or another collection's
server, does not send it).

:func:`find_server` trusts the file only when its pid is alive, it names this collection folder and the
model asked for, and ``/health`` answers with the token within :data:`HEALTH_TIMEOUT_S`; anything else
(no file, a stale one from a killed server, unreadable JSON, another model) means "search locally", with
the reason. :func:`search_remote` sends a :class:`~service.schemas.SearchQuery` as ``POST /search`` (text,
item, vector) or ``POST /search/upload`` (a file) and returns the response body: the same object
``mm search --json`` prints when it answers locally. The API key, when the server needs one, comes from
``MM_API_KEY`` and goes only into the ``X-API-Key`` header.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.schemas import SearchQuery

log = logging.getLogger(__name__)

SERVE_FILE = "serve.json"
INSTANCE_HEADER = "x-mm-instance"
API_KEY_ENV = "MM_API_KEY"
HEALTH_TIMEOUT_S = 2.0  # a warm server answers /health in milliseconds; a busy one is not worth waiting for
SEARCH_TIMEOUT_S = 120.0  # a query file's upload and embedding on a loaded machine
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a search answer is a few KB; never read an unbounded body


class RemoteError(RuntimeError):
    """The server refused the query (its JSON error message, one line)."""


@dataclass(frozen=True)
class ServerInfo:
    """What ``serve.json`` holds."""

    pid: int
    host: str
    port: int
    started: float
    instance: str
    model: str
    adapter: str | None
    collection: str

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


def new_instance() -> str:
    return secrets.token_hex(16)


def same_model(a: str, b: str) -> bool:
    """Whether two ``--model`` values name the same model (a config name, or the same checkpoint folder)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def write_serve_file(collection: Path, info: ServerInfo) -> Path:
    from index.atomic import atomic_write_json

    path = Path(collection) / SERVE_FILE
    atomic_write_json(path, {**asdict(info), "url": info.url})
    return path


def remove_serve_file(collection: Path, instance: str) -> None:
    """Remove ``serve.json`` if it is still this server's (a later server on the collection may own it)."""
    path = Path(collection) / SERVE_FILE
    info = read_serve_file(collection)
    if info is not None and info.instance == instance:
        path.unlink(missing_ok=True)


def read_serve_file(collection: Path) -> ServerInfo | None:
    """The file's contents, or None when it is missing or not what ``mm serve`` writes."""
    path = Path(collection) / SERVE_FILE
    try:
        if path.stat().st_size > 64 * 1024:
            return None
        raw = json.loads(path.read_text())
        return ServerInfo(
            pid=int(raw["pid"]),
            host=str(raw["host"]),
            port=int(raw["port"]),
            started=float(raw["started"]),
            instance=str(raw["instance"]),
            model=str(raw["model"]),
            adapter=None if raw.get("adapter") is None else str(raw["adapter"]),
            collection=str(raw["collection"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("ignoring %s: %s", path, exc)
        return None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def server_info(collection: Path, host: str, port: int, model: str, adapter: Path | None, instance: str):
    return ServerInfo(
        pid=os.getpid(),
        host=host,
        port=port,
        started=time.time(),
        instance=instance,
        model=model,
        adapter=None if adapter is None else str(Path(adapter).resolve()),
        collection=str(Path(collection).resolve()),
    )


def find_server(collection: Path, model: str) -> tuple[ServerInfo | None, str]:
    """The live server of ``collection`` serving ``model``, or None and why not (for the user)."""
    info = read_serve_file(collection)
    if info is None:
        return None, "no server running"
    if not pid_alive(info.pid):
        return None, f"no server running (a stale {SERVE_FILE} names pid {info.pid}, which has exited)"
    if Path(info.collection) != Path(collection).resolve():
        return None, f"{SERVE_FILE} names another folder ({info.collection}); was the collection copied?"
    if info.adapter is not None or not same_model(info.model, model):
        served = info.model + (f" with the adapter {info.adapter}" if info.adapter else "")
        return None, f"the server at {info.url} serves {served!r}, not {model!r}"
    try:
        req = urllib.request.Request(info.url + "/health")
        with urllib.request.urlopen(req, timeout=HEALTH_TIMEOUT_S) as resp:
            token = resp.headers.get(INSTANCE_HEADER)
            resp.read(64 * 1024)
    except (OSError, ValueError) as exc:  # refused, timed out, HTTP error
        return None, f"the server at {info.url} does not answer ({exc})"
    if token != info.instance:
        return None, f"what answers at {info.url} is not the server named in {SERVE_FILE}"
    return info, ""


def _headers() -> dict[str, str]:
    key = os.environ.get(API_KEY_ENV, "").strip()
    return {"X-API-Key": key} if key else {}


def _multipart(fields: dict[str, str], file_field: str, path: Path) -> tuple[bytes, str]:
    boundary = "mm-" + secrets.token_hex(12)
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    filename = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
        f"Content-Type: {mime}\r\n\r\n"
    )
    parts += [head.encode(), path.read_bytes(), f"\r\n--{boundary}--\r\n".encode()]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def upload_fields(query: SearchQuery) -> dict[str, str]:
    """The ``/search/upload`` form fields of a file query (its JSON fields, as the form has them)."""
    out: dict[str, str] = {"k": str(query.k), "offset": str(query.offset), "mode": query.mode}
    if query.modalities:
        out["modalities"] = ",".join(query.modalities)
    if query.allow_partial:
        out["allow_partial"] = "true"
    f = query.filters.model_dump(mode="json", exclude_none=True) if query.filters else {}
    for key, value in f.items():
        out[key] = ",".join(value) if isinstance(value, list) else str(value)
    return out


def search_remote(server: ServerInfo, query: SearchQuery) -> dict[str, Any]:
    """``query`` answered by ``server``: the ``SearchResponse`` body. Raises RemoteError with the server's
    message when it refuses the query, OSError when it cannot be reached."""
    headers = _headers()
    if query.media is not None:
        from mm.media import sniff

        # the header check the local path makes first (size, kind, limits): the same one-line refusal,
        # and never a file of unbounded size read into memory for the upload
        sniff(query.media.path, query.media.name, query.media.modality)
        body, ctype = _multipart(upload_fields(query), "file", Path(query.media.path))
        url = server.url + "/search/upload"
    else:
        body = json.dumps(query.model_dump(mode="json", exclude_none=True)).encode()
        ctype, url = "application/json", server.url + "/search"
    req = urllib.request.Request(url, data=body, method="POST", headers={**headers, "Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=SEARCH_TIMEOUT_S) as resp:
            return json.loads(resp.read(MAX_RESPONSE_BYTES))
    except urllib.error.HTTPError as exc:
        raise RemoteError(error_message(exc)) from None


def error_message(exc: urllib.error.HTTPError) -> str:
    """The server's one-line message of an error answer (``{"error": {"message"}}``)."""
    try:
        message = json.loads(exc.read(64 * 1024))["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        message = exc.reason
    if exc.code == 401:
        return f"the server needs an API key: set {API_KEY_ENV} (or search with --local)"
    return f"{message} (server: HTTP {exc.code})"
