"""Every route of ``/openapi.json`` (and the WebSocket) against every way of sending a key, on ``mm serve``.

Without the right key each route answers 401 (or 403) and the WebSocket handshake is refused; with it, none
does. Then every line the server wrote at debug level (uvicorn's access log included) is scanned: no key,
right or wrong, may appear in it, however it was sent.
"""

from __future__ import annotations

import base64
import re

import httpx
import pytest
from live import mm_serve

RIGHT = "mm-right-3f9c2e71d4"
OTHER = "mm-other-8a1b6c0e55"  # a second valid key: any of the configured keys is accepted
WRONG = "mm-wrong-5d0b7aa913"
# Routes that answer without a key (the page, its assets and the docs are not in the schema).
PUBLIC = {("GET", "/health")}
UNLISTED_PUBLIC = ["/", "/docs", "/openapi.json"]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# name -> (headers, query params, accepted?). Auth schemes are case-insensitive (RFC 9110), keys are not.
HTTP_VARIANTS: dict[str, tuple[dict[str, str], dict[str, str], bool]] = {
    "none": ({}, {}, False),
    "x-api-key wrong": ({"X-API-Key": WRONG}, {}, False),
    "x-api-key right": ({"X-API-Key": RIGHT}, {}, True),
    "x-api-key other": ({"X-API-Key": OTHER}, {}, True),
    "x-api-key empty": ({"X-API-Key": ""}, {}, False),
    "x-api-key upper-cased": ({"X-API-Key": RIGHT.upper()}, {}, False),
    "x-api-key prefix": ({"X-API-Key": RIGHT[:-1]}, {}, False),
    "x-api-key extended": ({"X-API-Key": RIGHT + "0"}, {}, False),
    "bearer wrong": ({"Authorization": f"Bearer {WRONG}"}, {}, False),
    "bearer right": ({"Authorization": f"Bearer {RIGHT}"}, {}, True),
    "bearer lower-case scheme": ({"Authorization": f"bearer {RIGHT}"}, {}, True),
    "bearer no key": ({"Authorization": "Bearer"}, {}, False),
    "bare key in authorization": ({"Authorization": RIGHT}, {}, False),
    "basic key": ({"Authorization": f"Basic {_b64(RIGHT)}"}, {}, False),
    "basic user:key": ({"Authorization": f"Basic {_b64('mm:' + RIGHT)}"}, {}, False),
    "token scheme": ({"Authorization": f"Token {RIGHT}"}, {}, False),
    "query api_key (HTTP does not read it)": ({}, {"api_key": RIGHT}, False),
    "wrong bearer, right header": ({"Authorization": f"Bearer {WRONG}", "X-API-Key": RIGHT}, {}, True),
}
WS_VARIANTS: dict[str, tuple[dict[str, str], str, bool]] = {
    "none": ({}, "", False),
    "query wrong": ({}, f"?api_key={WRONG}", False),
    "query right": ({}, f"?api_key={RIGHT}", True),
    "query other": ({}, f"?api_key={OTHER}", True),
    "query prefix": ({}, f"?api_key={RIGHT[:-1]}", False),
    "x-api-key right": ({"X-API-Key": RIGHT}, "", True),
    "x-api-key wrong": ({"X-API-Key": WRONG}, "", False),
    "bearer right": ({"Authorization": f"Bearer {RIGHT}"}, "", True),
    "bearer wrong": ({"Authorization": f"Bearer {WRONG}"}, "", False),
    "basic key": ({"Authorization": f"Basic {_b64(RIGHT)}"}, "", False),
}
SECRETS = [RIGHT, OTHER, WRONG, RIGHT[:-1], RIGHT.upper(), _b64(RIGHT), _b64("mm:" + RIGHT)]


def _operations(spec: dict) -> list[tuple[str, str, dict]]:
    ops = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                ops.append((method.upper(), path, op))
    return ops


def _concrete(path: str) -> str:
    """A path with its parameters filled: numbers for ids, a plain word otherwise."""
    return re.sub(r"\{(\w+)\}", lambda m: "1" if m.group(1).endswith("_id") else "x", path)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, media_root):
    """Run the whole matrix once; the tests below read its answers and the server's log lines."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    work = tmp_path_factory.mktemp("auth")
    env = {"MM_API_KEYS": f"{RIGHT},{OTHER}", "MM_ALLOWED_ROOTS": str(media_root)}
    answers: dict[tuple[str, str, str], int] = {}
    ws_answers: dict[str, int] = {}
    with mm_serve(work / "c", work / "server.log", env) as base:
        with httpx.Client(base_url=base, timeout=30) as http:
            spec = http.get("/openapi.json").json()
            ops = _operations(spec)
            public = {path: http.get(path).status_code for path in UNLISTED_PUBLIC}
            for method, path, op in ops:
                body = {"json": {}} if "requestBody" in op else {}
                for name, (headers, params, _) in HTTP_VARIANTS.items():
                    resp = http.request(method, _concrete(path), headers=headers, params=params, **body)
                    answers[(method, path, name)] = resp.status_code
        ws_base = base.replace("http://", "ws://") + "/ws"
        for name, (headers, query, _) in WS_VARIANTS.items():
            try:
                with connect(ws_base + query, additional_headers=headers, open_timeout=10) as ws:
                    ws.close()
                ws_answers[name] = 101
            except InvalidStatus as exc:
                ws_answers[name] = exc.response.status_code
    logs = (work / "server.log").read_text(errors="replace").splitlines()
    return {"ops": ops, "answers": answers, "ws": ws_answers, "public": public, "logs": logs}


def test_schema_lists_the_routes_that_matter(matrix):
    routes = {(m, p) for m, p, _ in matrix["ops"]}
    for route in [("POST", "/search"), ("POST", "/items"), ("POST", "/search/upload"), ("POST", "/ingest")]:
        assert route in routes, sorted(routes)
    assert any(p.startswith("/v1/") for _, p in routes), "the OpenAI routes are missing from the schema"
    assert len(routes) >= 15


def test_every_route_refuses_without_the_right_key(matrix):
    leaks = [
        (method, path, name, status)
        for (method, path, name), status in matrix["answers"].items()
        if (method, path) not in PUBLIC and not HTTP_VARIANTS[name][2] and status not in (401, 403)
    ]
    assert not leaks, leaks


def test_every_route_admits_the_right_key(matrix):
    refused = [
        (method, path, name, status)
        for (method, path, name), status in matrix["answers"].items()
        if HTTP_VARIANTS[name][2] and (status in (401, 403) or status >= 500)
    ]
    assert not refused, refused


def test_public_routes_need_no_key(matrix):
    for (method, path, name), status in matrix["answers"].items():
        if (method, path) in PUBLIC:
            assert status == 200, (method, path, name, status)
    assert matrix["public"] == dict.fromkeys(UNLISTED_PUBLIC, 200)


def test_websocket_handshake(matrix):
    expected = {name: 101 if ok else 403 for name, (_, _, ok) in WS_VARIANTS.items()}
    assert matrix["ws"] == expected


def test_no_key_appears_in_any_log_line(matrix):
    assert any('"POST /search' in line for line in matrix["logs"]), "the access log was not captured"
    leaked = [line for line in matrix["logs"] if any(secret in line for secret in SECRETS)]
    assert not leaked, f"{len(leaked)} log lines hold a key, e.g. {leaked[:3]}"
