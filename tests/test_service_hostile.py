"""Hostile and unlucky requests (issue 18): each gets a 4xx with a JSON body, never a 500, and the
OpenAPI schema states the bound the server enforces. One app per module, on the fake embedder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from conftest import FakeEmbedder, image_bytes
from fastapi.testclient import TestClient

from service.app import create_app
from service.limits import INT64_MAX, MAX_TAGS
from service.settings import Settings

TOO_BIG = INT64_MAX + 1


def assert_4xx(resp, status: int = 422) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]


@pytest.fixture(scope="module")
def settings(tmp_path_factory, media_root) -> Settings:
    return Settings(collection=tmp_path_factory.mktemp("hostile") / "coll", allowed_roots=[media_root])


@pytest.fixture(scope="module")
def client(settings):
    # raise_server_exceptions=False: a 500 must show up as a status here, not as a raised exception
    with TestClient(create_app(settings, embedder=FakeEmbedder()), raise_server_exceptions=False) as c:
        resp = c.post("/items/text", json={"text": "a red circle", "tags": ["x"]})
        assert resp.status_code == 201, resp.text
        c.item_id = resp.json()["id"]
        yield c


@pytest.fixture(scope="module")
def spec(client) -> dict:
    return client.get("/openapi.json").json()


# -- issue 18 item 6: numbers, lists and names beyond what the storage takes ------------------------


@pytest.mark.parametrize("suffix", ["", "/media", "/thumbnail"])
@pytest.mark.parametrize("item_id", [TOO_BIG, -TOO_BIG - 1, 10**30])
def test_item_ids_beyond_int64_are_422(client, suffix, item_id):
    assert_4xx(client.get(f"/items/{item_id}{suffix}"))


def test_delete_of_an_id_beyond_int64_is_422_and_the_connection_lives_on(client):
    assert_4xx(client.delete(f"/items/{TOO_BIG}"))
    assert client.get(f"/items/{client.item_id}").status_code == 200


def test_search_item_id_and_offsets_beyond_int64_are_422(client):
    assert_4xx(client.post("/search", json={"item_id": TOO_BIG}))
    assert_4xx(client.post("/search", json={"query": "red", "offset": TOO_BIG}))
    assert_4xx(client.get("/items", params={"offset": TOO_BIG}))
    assert client.get("/items", params={"offset": INT64_MAX}).json()["items"] == []


def test_a_thousand_tag_filters_are_422_not_an_sql_error(client):
    tags = [f"t{i}" for i in range(1000)]
    assert (
        "tags"
        in assert_4xx(client.post("/search", json={"query": "red", "filters": {"tags": tags}}))["message"]
    )
    upload = {"file": ("q.png", image_bytes(), "image/png")}
    resp = client.post("/search/upload", files=upload, data={"tags": ",".join(tags)})
    assert_4xx(resp)
    # the bound itself still searches
    ok = client.post("/search", json={"query": "red", "filters": {"tags": tags[:MAX_TAGS]}})
    assert ok.status_code == 200, ok.text


def test_too_many_tags_on_an_item_are_422(client):
    assert_4xx(client.post("/items/text", json={"text": "x", "tags": [f"t{i}" for i in range(1000)]}))
    resp = client.post("/items", data={"text": "x", "tags": ",".join(f"t{i}" for i in range(MAX_TAGS + 1))})
    assert_4xx(resp)


def test_ingest_path_with_a_name_over_255_bytes_is_422(client, media_root):
    err = assert_4xx(client.post("/ingest", json={"path": str(media_root / ("a" * 256))}))
    assert "255" in err["message"]
    assert_4xx(client.post("/ingest", json={"path": str(media_root / ("é" * 128))}))  # 256 bytes
    assert_4xx(client.post("/ingest", json={"path": str(media_root) + "/\x00x"}))


def test_ingest_path_whose_resolution_fails_is_422(client, media_root):
    # a symlink loop under an allowed root: resolving it fails before any walk
    loop = media_root / "loop-e"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    try:
        resp = client.post("/ingest", json={"path": str(loop / "x")})
        assert resp.status_code in (404, 422), resp.text
    finally:
        loop.unlink()


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "text", "text": 5}],
        [{"type": "text", "text": ["a"]}],
        [{"type": "text"}],
        [5],
        [{"text": "no type"}],
    ],
)
def test_chat_parts_whose_text_is_not_a_string_are_422(client, content):
    resp = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert_4xx(resp)


def test_chat_messages_up_to_the_limit_are_answered(client):
    from service.limits import MAX_MESSAGE_CHARS

    text = ("red circle " * MAX_MESSAGE_CHARS)[:MAX_MESSAGE_CHARS]
    for content in (text, [{"type": "text", "text": text}], [{"type": "text", "text": "red"}] * 64):
        resp = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
        assert resp.status_code == 200, resp.text[:300]
    too_many = [{"type": "text", "text": "red"}] * 65
    assert_4xx(
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": too_many}]})
    )


def test_chat_parts_of_other_types_are_ignored(client):
    content = [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "red circle"}]
    resp = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert resp.status_code == 200, resp.text


def test_schema_states_the_bounds(spec):
    params = spec["paths"]["/items/{item_id}"]["get"]["parameters"]
    item_id = next(p for p in params if p["name"] == "item_id")["schema"]
    assert item_id["maximum"] == INT64_MAX and item_id["minimum"] == 1
    for method, path in (("get", "/items/{item_id}/media"), ("get", "/items/{item_id}/thumbnail")):
        params = spec["paths"][path][method]["parameters"]
        assert next(p for p in params if p["name"] == "item_id")["schema"]["maximum"] == INT64_MAX
    params = spec["paths"]["/items/{item_id}"]["delete"]["parameters"]
    assert next(p for p in params if p["name"] == "item_id")["schema"]["maximum"] == INT64_MAX
    schemas = spec["components"]["schemas"]
    assert schemas["SearchFilters"]["properties"]["tags"]["anyOf"][0]["maxItems"] == MAX_TAGS
    ingest = schemas["IngestRequest"]["properties"]["path"]
    assert ingest["pattern"] == "^/" and ingest["maxLength"] == 4096
    part = schemas["ContentPart"]["properties"]["text"]
    assert part["anyOf"][0]["type"] == "string"


def test_items_still_work_after_the_hostile_requests(client):
    assert client.get(f"/items/{client.item_id}").json()["caption"] == "a red circle"
    hits = client.post("/search", json={"query": "a red circle"}).json()["results"]
    assert [h["id"] for h in hits][:1] == [client.item_id]


@pytest.fixture(scope="module")
def media_item(client) -> tuple[str, bytes]:
    data = image_bytes((0, 200, 200))
    resp = client.post("/items", files={"file": ("range.png", data, "image/png")})
    assert resp.status_code == 201, resp.text
    return resp.json()["media_url"], data


@pytest.mark.parametrize("header", ["bytes", "items=0-1", "bytes=5-2", "bytes=x-y", "bytes=-"])
def test_a_malformed_range_is_a_json_400(client, media_item, header):
    url, _ = media_item
    assert assert_4xx(client.get(url, headers={"Range": header}), 400)["code"] == "bad_range"


def test_a_range_past_the_end_is_a_json_416_naming_the_size(client, media_item):
    url, data = media_item
    resp = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert assert_4xx(resp, 416)["code"] == "range_not_satisfiable"
    assert resp.headers["content-range"] == f"bytes */{len(data)}"


def test_good_ranges_and_an_if_range_still_work(client, media_item):
    url, data = media_item
    part = client.get(url, headers={"Range": "bytes=-10"})
    assert part.status_code == 206 and part.content == data[-10:]
    # a stale If-Range asks for the whole file, whatever the range says
    whole = client.get(url, headers={"Range": "bytes=5-2", "If-Range": '"stale"'})
    assert whole.status_code == 200 and whole.content == data


# -- issue 18 item 7 and issue 17 item 6: the WebSocket ------------------------------------------------

TERMINAL = {"results", "done", "error"}


def ws_burst(app, messages: list[dict], *, expect: int, timeout: float = 10.0) -> list[dict]:
    """Drive ``/ws`` at the ASGI level, every message of ``messages`` already received at once (as when
    they arrive in one TCP write: the server reads them without waiting), until ``expect`` terminal
    messages came back; then the client leaves. Returns every message the server sent."""
    import asyncio
    import contextlib
    import json

    async def session() -> list[dict]:
        inbox = [{"type": "websocket.connect"}]
        inbox += [{"type": "websocket.receive", "text": json.dumps(m)} for m in messages]
        out: list[dict] = []
        enough = asyncio.Event()

        async def receive() -> dict:
            if inbox:
                return inbox.pop(0)  # no await: the next frame is already there
            await enough.wait()
            return {"type": "websocket.disconnect", "code": 1000}

        async def send(msg: dict) -> None:
            if msg["type"] == "websocket.send":
                out.append(json.loads(msg["text"]))
                if sum(m["type"] in TERMINAL for m in out) >= expect:
                    enough.set()

        scope = {
            "type": "websocket",
            "path": "/ws",
            "raw_path": b"/ws",
            "query_string": b"",
            "headers": [],
            "scheme": "ws",
            "server": ("testserver", 80),
            "client": ("testclient", 50000),
            "root_path": "",
            "subprotocols": [],
        }
        with contextlib.suppress(TimeoutError):  # the assertions below say what was missing
            await asyncio.wait_for(app(scope, receive, send), timeout)
        return out

    return asyncio.run(session())


def terminals(out: list[dict], rid) -> list[dict]:
    return [m for m in out if m.get("id") == rid and m["type"] in TERMINAL]


@pytest.mark.parametrize("bad_id", [[1, 2], {"a": 1}, 1.5, True])
def test_ws_cancel_with_an_unusable_id_is_an_error_and_the_connection_lives_on(client, bad_id):
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "cancel", "id": bad_id})
        err = ws.receive_json()
        assert err["type"] == "error" and err["id"] is None and err["status"] == 422, err
        ws.send_json({"type": "search", "id": "after", "query": "red circle", "k": 1})
        assert ws.receive_json()["type"] == "results"


def test_ws_bad_cancel_does_not_cancel_other_requests(client):
    out = ws_burst(
        client.app,
        [
            {"type": "generate", "id": "g", "query": "red circle", "k": 2},
            {"type": "cancel", "id": [1, 2]},
            {"type": "search", "id": "s", "query": "red circle", "k": 1},
        ],
        expect=3,
    )
    assert [m["type"] for m in terminals(out, "g")] == ["done"]
    assert "cancelled" not in terminals(out, "g")[0]
    assert [m["type"] for m in terminals(out, "s")] == ["results"]
    assert [m["status"] for m in out if m["type"] == "error"] == [422]


@pytest.mark.parametrize("kind", ["generate", "search"])
def test_ws_request_and_cancel_in_one_write_get_exactly_one_terminal_message(client, kind):
    for i in range(20):
        request = {"type": kind, "id": i, "query": "red circle", "k": 2}
        out = ws_burst(client.app, [request, {"type": "cancel", "id": i}], expect=1)
        ends = terminals(out, i)
        assert len(ends) == 1, (i, out)
        assert ends[0] == {"type": "done", "id": i, "cancelled": True}, (i, out)


def test_ws_cancel_of_a_finished_request_adds_nothing(client):
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "search", "id": 1, "query": "red", "k": 1})
        assert ws.receive_json()["type"] == "results"
        ws.send_json({"type": "cancel", "id": 1})
        ws.send_json({"type": "search", "id": 2, "query": "red", "k": 1})
        assert ws.receive_json() | {"results": None} == {"type": "results", "id": 2, "results": None}


# -- issue 18 item 8: no key in any log line ---------------------------------------------------------


@contextlib.contextmanager
def serving(app, **config) -> Iterator[int]:
    """``app`` under a real uvicorn server on a free port (in a thread); yields the port."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="info", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)


def test_api_keys_never_reach_the_logs(tmp_path):
    """A real uvicorn server with its own logging config (access log on), plus a root handler as the
    CLI sets up: keys sent in the URL, in headers and over the WebSocket appear in no line."""
    import copy
    import logging

    import httpx
    from uvicorn.config import LOGGING_CONFIG
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    key, wrong, upstream = "sekrit-key-0001", "wrong-key-0002", "sk-upstream-0003"
    log_file = tmp_path / "server.log"
    config = copy.deepcopy(LOGGING_CONFIG)
    for handler in config["handlers"].values():
        handler.pop("stream", None)
        handler.update({"class": "logging.FileHandler", "filename": str(log_file)})
    root_handler = logging.FileHandler(log_file)  # what `mm`'s logging.basicConfig adds
    root_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(root_handler)
    settings = Settings(collection=tmp_path / "coll", api_keys=[key], openai_api_key=upstream)
    try:
        with serving(create_app(settings, embedder=FakeEmbedder()), log_config=config) as port:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
                assert http.get("/stats", params={"api_key": key}).status_code == 401  # keys go in headers
                assert http.get("/stats", headers={"Authorization": f"Bearer {key}"}).status_code == 200
                assert http.get("/stats", headers={"X-API-Key": key}).status_code == 200
                assert http.get("/items", params={"token": wrong}).status_code == 401
            with connect(f"ws://127.0.0.1:{port}/ws?api_key={key}") as ws:
                ws.send('{"type": "search", "id": 1, "query": "red", "k": 1}')
                assert "results" in ws.recv(timeout=10)
            with pytest.raises(InvalidStatus), connect(f"ws://127.0.0.1:{port}/ws?api_key={wrong}"):
                pass
            # our own loggers: a message quoting a header, and a traceback quoting the upstream key
            headers = [(b"authorization", f"Bearer {key}")]
            logging.getLogger("service.routers.ws").warning("headers were %s", headers)
            try:
                raise RuntimeError(f"upstream refused key {upstream}")
            except RuntimeError:
                logging.getLogger("service.generation").exception("backend failed")
    finally:
        logging.getLogger().removeHandler(root_handler)
        root_handler.close()
    text = log_file.read_text()
    assert "/ws?api_key=[redacted]" in text and "GET /stats?api_key=[redacted]" in text, text
    assert "backend failed" in text and "upstream refused key [redacted]" in text, text
    for secret in (key, wrong, upstream):
        assert secret not in text, text


@pytest.mark.parametrize(
    "line",
    [
        '127.0.0.1:5 - "GET /ws?x=1&api_key=K3y-value HTTP/1.1" 101',
        "Authorization: Bearer K3y-value",
        "x-api-key: K3y-value",
        "{'X-API-Key': 'K3y-value', 'accept': '*/*'}",
        "[(b'authorization', b'Bearer K3y-value')]",
        "GET /items?access_token=K3y-value",
        "the configured key K3y-value itself",
    ],
)
def test_redact_masks_every_form_a_key_takes(line):
    from service.redact import MASK, redact

    secrets = ["K3y-value"] if "configured" in line else []  # the others by their form alone
    out = redact(line, secrets)
    assert "K3y-value" not in out and MASK in out, out
    assert redact(out, secrets) == out  # masking again changes nothing


# -- issue 18 item 10 (service parts) ------------------------------------------------------------------


@pytest.mark.parametrize("since", ["nan", "inf", "-inf", "1e400"])
def test_a_time_that_is_not_finite_is_422(client, since):
    upload = {"file": ("q.png", image_bytes(), "image/png")}
    assert_4xx(client.post("/search/upload", files=upload, data={"since": since}))
    assert_4xx(client.post("/search/upload", files=upload, data={"until": since}))
    if since == "1e400":  # the one a JSON number can spell
        body = b'{"query": "red", "filters": {"since": 1e400}}'
        assert_4xx(client.post("/search", content=body, headers={"content-type": "application/json"}))


@pytest.mark.parametrize("since", ["nan", "inf", "1e400"])
def test_cli_search_refuses_a_time_that_is_not_finite(tmp_path, capsys, since):
    from service.cli import main

    code = main(["search", "red", "--filter", f"since={since}", "--collection", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "finite" in err and len(err.splitlines()) == 1, (code, err)


def _raw_request(port: int, head: bytes, body: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send ``head`` + ``body`` and wait: (what came back, whether the server closed the connection)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return data, False
            if not chunk:
                return data, True
            data += chunk


@pytest.mark.parametrize("path", ["/items/text", "/search", "/v1/chat/completions"])
def test_a_body_shorter_than_its_length_gets_408_and_the_connection_closes(tmp_path, path):
    app = create_app(Settings(collection=tmp_path / "coll", body_timeout_s=0.5), embedder=FakeEmbedder())
    with serving(app) as port:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n"
        ).encode()
        data, closed = _raw_request(port, head, b'{"query": "re')
        assert data.startswith(b"HTTP/1.1 408"), data
        assert b'"request_timeout"' in data and closed, data
        # and the server answers the next client
        data, _ = _raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"")
        assert data.startswith(b"HTTP/1.1 200"), data


def test_a_slow_but_steady_body_is_read_whole(tmp_path):
    import socket
    import time

    app = create_app(Settings(collection=tmp_path / "coll", body_timeout_s=0.5), embedder=FakeEmbedder())
    body = b'{"text": "a slow red circle"}'
    with serving(app) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /items/text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        for i in range(0, len(body), 8):  # 4 pieces, 0.3 s apart: 1.2 s in all, no pause over 0.5 s
            sock.sendall(body[i : i + 8])
            time.sleep(0.3)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 201"), data


def test_options_and_405_name_every_method_of_the_path(client):
    resp = client.options(f"/items/{client.item_id}")
    assert resp.status_code == 204, resp.text
    allowed = {m.strip() for m in resp.headers["allow"].split(",")}
    assert {"GET", "DELETE", "OPTIONS"} <= allowed and "POST" not in allowed
    resp = client.post(f"/items/{client.item_id}")
    assert_4xx(resp, 405)
    assert {"GET", "DELETE"} <= {m.strip() for m in resp.headers["allow"].split(",")}


def test_schema_documents_the_body_errors_and_exactly_one_of(spec):
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if "requestBody" in op:
                missing = {"400", "408", "413", "422"} - set(op["responses"])
                assert not missing, (method, path, missing)
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    search = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert [b["required"] for b in search["oneOf"]] == [["query"], ["item_id"], ["vector"]]


def test_the_server_enforces_what_the_schema_says_of_exactly_one_of(client):
    assert client.post("/search", json={"query": "red", "item_id": None}).status_code == 200
    assert_4xx(client.post("/search", json={}))
    assert_4xx(client.post("/search", json={"query": "red", "item_id": client.item_id}))


def test_multipart_without_a_boundary_is_the_documented_400(client):
    resp = client.post("/items", content=b"abc", headers={"content-type": "multipart/form-data"})
    assert_4xx(resp, 400)


# -- issue 17 item 8: /docs works offline ----------------------------------------------------------


def test_docs_page_loads_every_asset_from_the_server(client):
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text
    html = page.text
    urls = re.findall(r'<script[^>]*\bsrc="([^"]+)"', html) + re.findall(r'<link[^>]*\bhref="([^"]+)"', html)
    assert any(u.endswith(".js") for u in urls) and any(u.endswith(".css") for u in urls), urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{url} is not on this server"
        asset = client.get(url)
        assert asset.status_code == 200, (url, asset.status_code)
        assert len(asset.content) > 0, url
    kinds = {client.get(u).headers["content-type"].split(";")[0] for u in urls}
    assert {"text/javascript", "text/css"} <= kinds
    # the page's script reads the schema from this server too, and calls no validator
    assert "url: '/openapi.json'" in html and '"validatorUrl": null' in html
    assert "http://" not in html and "https://" not in html


def test_docs_assets_are_a_fixed_list(client):
    assert_4xx(client.get("/docs/assets/index.html"), 404)
    assert_4xx(client.get("/docs/assets/..%2F__init__.py"), 404)
    assert client.get("/redoc").status_code == 404  # ReDoc would need a CDN: /docs is the page


# -- issue 18 item 3, API side: every text a route reads has a length limit ----------------------------


@pytest.fixture
def model_calls(client, monkeypatch) -> list[int]:
    """Texts handed to the embedder during a test (a refused request must not reach it)."""
    calls: list[int] = []
    emb = client.app.state.embedder
    encode = emb.encode_text

    def counting(texts):
        calls.append(len(texts))
        return encode(texts)

    monkeypatch.setattr(emb, "encode_text", counting)
    return calls


def test_over_long_texts_are_refused_before_the_model(client, model_calls):
    from service.limits import MAX_MESSAGE_CHARS, MAX_QUERY_CHARS, MAX_TEXT_CHARS

    long_query = "a" * (MAX_QUERY_CHARS + 1)
    assert_4xx(client.post("/search", json={"query": long_query}))
    assert_4xx(client.post("/generate", json={"query": long_query}))
    assert_4xx(client.post("/items/text", json={"text": "a" * (MAX_TEXT_CHARS + 1)}))
    assert_4xx(client.post("/items", data={"text": "a" * (MAX_TEXT_CHARS + 1)}))
    upload = {"file": ("q.png", image_bytes(), "image/png")}
    assert_4xx(client.post("/items", files=upload, data={"caption": "a" * (MAX_TEXT_CHARS + 1)}))
    message = {"role": "user", "content": "a" * (MAX_MESSAGE_CHARS + 1)}
    assert_4xx(client.post("/v1/chat/completions", json={"messages": [message]}))
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "search", "id": 1, "query": long_query})
        assert ws.receive_json()["status"] == 422
    assert model_calls == []


def test_an_8_mb_chat_message_is_refused_without_tokenizing_it(client, model_calls):
    body = {"messages": [{"role": "user", "content": "word " * ((8 << 20) // 5)}]}
    err = assert_4xx(client.post("/v1/chat/completions", json=body))
    assert "at most" in err["message"] and model_calls == []


def test_schema_states_every_text_limit(spec):
    from service.limits import MAX_MESSAGE_CHARS, MAX_QUERY_CHARS, MAX_TEXT_CHARS

    schemas = spec["components"]["schemas"]

    def text_bound(schema: dict) -> int:
        options = schema.get("anyOf", [schema])
        return next(o["maxLength"] for o in options if o.get("type") == "string")

    search = spec["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert text_bound(schemas[search["$ref"].rsplit("/", 1)[1]]["properties"]["query"]) == MAX_QUERY_CHARS
    assert text_bound(schemas["GenerateRequest"]["properties"]["query"]) == MAX_QUERY_CHARS
    assert text_bound(schemas["TextItemIn"]["properties"]["text"]) == MAX_TEXT_CHARS
    assert text_bound(schemas["ChatMessage"]["properties"]["content"]) == MAX_MESSAGE_CHARS
    assert text_bound(schemas["ContentPart"]["properties"]["text"]) == MAX_MESSAGE_CHARS
    form = schemas["Body_add_item_items_post"]["properties"]
    assert text_bound(form["text"]) == MAX_TEXT_CHARS and text_bound(form["caption"]) == MAX_TEXT_CHARS


def test_forms_and_chat_say_what_the_server_takes(client, spec):
    form = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["k"]["maximum"] == 20 and form["additionalProperties"] is False
    upload = {"file": ("q.png", image_bytes(), "image/png")}
    assert_4xx(client.post("/generate", files=upload, data={"k": "21"}))
    assert_4xx(client.post("/generate", files=upload, data={"surprise": "x"}))
    assert_4xx(client.post("/search/upload", files=upload, data={"modalities": "video"}))
    assert (
        client.post("/search/upload", files=upload, data={"modalities": " image, audio"}).status_code == 200
    )
    # a form field is a value or absent: no null in a multipart body's schema
    items_form = spec["components"]["schemas"]["Body_add_item_items_post"]
    assert all("anyOf" not in p for p in items_form["properties"].values())
    assert [b["required"] for b in items_form["oneOf"]] == [["file"], ["text"]]
    # chat: the question is the last user message with text, as the schema's "contains" says
    messages = spec["components"]["schemas"]["ChatRequest"]["properties"]["messages"]
    assert messages["contains"]["properties"]["role"] == {"const": "user"}
    image_only = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    body = {"messages": [{"role": "user", "content": "red circle"}, image_only]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert_4xx(client.post("/v1/chat/completions", json={"messages": [image_only]}))
    streamed = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} <= set(streamed)


def test_a_key_split_over_log_arguments_is_masked():
    """The websockets library logs each handshake header as ``"< %s: %s" % (name, value)``: neither
    argument alone looks like a header, and a wrong key is no configured secret."""
    import logging

    from service.redact import RedactSecrets

    record = logging.LogRecord(
        "uvicorn.error", logging.DEBUG, __file__, 1, "< %s: %s", ("x-api-key", "k-9z"), None
    )
    RedactSecrets(["configured-key"]).filter(record)
    assert record.getMessage() == "< x-api-key: [redacted]"
    access = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("c", "GET", "/ws?api_key=k-9z", "1.1", 101),
        None,
    )
    RedactSecrets().filter(access)
    assert access.args == ("c", "GET", "/ws?api_key=[redacted]", "1.1", 101)  # its formatter reads them


def test_a_500_keeps_the_connection(tmp_path, monkeypatch):
    """An unexpected error is a JSON 500, logged, and the connection serves the next request (the
    server used to drop it, so the client's next request on it was reset)."""
    app = create_app(Settings(collection=tmp_path / "coll"), embedder=FakeEmbedder())
    with serving(app) as port:
        import socket

        def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        monkeypatch.setattr(app.state.collection, "count", broken)  # GET /health reads the count
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 500") and b'"internal_error"' in first, first
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            second = b""
            while chunk := sock.recv(65536):
                second += chunk
            assert second.startswith(b"HTTP/1.1 200"), second[:200]


def test_citations_carry_a_snippet_not_the_stored_text(client):
    """A cited item's whole text (up to 1 MB from a file, 100,000 characters here) is its own route's
    (GET /items/{id}); an answer's citations carry a snippet, as search hits do (issue 18.3)."""
    from mm.media import SNIPPET_CHARS
    from service.generation import ExtractiveGenerator
    from service.generation.backends.extractive import Rules
    from service.limits import MAX_TEXT_CHARS
    from service.routers.generate import generators_of

    text = "A harbour lantern. " + "fishing boats at dawn " * (MAX_TEXT_CHARS // 23)
    resp = client.post("/items/text", json={"text": text[:MAX_TEXT_CHARS]})
    assert resp.status_code == 201, resp.text
    long_id = resp.json()["id"]
    made = generators_of(client.app)._made
    saved = dict(made)
    made["extractive"] = ExtractiveGenerator(rules=Rules(item_min=-1.0, answer_min=-1.0, margin=0.0))
    try:
        question = "harbour lantern"
        answers = {
            "/generate": client.post("/generate", json={"query": question}).json()["citations"],
            "chat": client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": question}]}
            ).json()["mm_citations"],
        }
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "generate", "id": 1, "query": question})
            while (msg := ws.receive_json())["type"] not in ("done", "error"):
                if msg["type"] == "citations":
                    answers["ws"] = msg["citations"]
    finally:
        made.clear()
        made.update(saved)
    for route, cites in answers.items():
        assert long_id in [c["id"] for c in cites], (route, cites)  # the long item is cited
        assert all(len(c["caption"]) <= SNIPPET_CHARS for c in cites), route
        assert next(c["caption"] for c in cites if c["id"] == long_id).startswith("A harbour lantern.")


def test_a_page_of_items_carries_snippets_and_each_item_its_stored_text(client):
    """A page of up to 1,000 items would carry every stored text whole (1 MB each from a file: a 1 GB
    answer); it carries snippets, and GET /items/{id} the whole text (issue 18.3)."""
    from mm.media import SNIPPET_CHARS

    text = "A long ledger. " + "entries of the harbour " * 4000
    resp = client.post("/items/text", json={"text": text})
    assert resp.status_code == 201, resp.text
    item_id = resp.json()["id"]
    page = client.get("/items", params={"modality": "text", "limit": 1000}).json()["items"]
    (listed,) = [i for i in page if i["id"] == item_id]
    assert len(listed["caption"]) <= SNIPPET_CHARS and listed["caption"].startswith("A long ledger.")
    assert all(len(i["caption"]) <= SNIPPET_CHARS for i in page)
    assert client.get(f"/items/{item_id}").json()["caption"] == text


def test_a_chat_question_reaches_the_backend_bounded(client):
    """The last user message may hold 64 parts of 32,000 characters (2 MB): the question a backend
    answers is its first MAX_QUERY_CHARS, as /generate's (the extractive backend scanned the whole of
    it three times per request, about a second of CPU)."""
    from service.limits import MAX_MESSAGE_CHARS, MAX_QUERY_CHARS
    from service.routers.generate import generators_of

    class Recorder:
        name = "extractive"
        max_items = None

        def __init__(self) -> None:
            self.questions: list[str] = []

        def stream(self, question, hits, *, max_tokens, temperature, stop):
            self.questions.append(question)
            return iter(["ok"])

    made = generators_of(client.app)._made
    saved = dict(made)
    made["extractive"] = recorder = Recorder()
    try:
        part = {"type": "text", "text": ("a red circle " * MAX_MESSAGE_CHARS)[:MAX_MESSAGE_CHARS]}
        body = {"messages": [{"role": "user", "content": [part] * 64}]}
        resp = client.post("/v1/chat/completions", json=body)
    finally:
        made.clear()
        made.update(saved)
    assert resp.status_code == 200, resp.text[:300]
    (question,) = recorder.questions
    assert 0 < len(question) <= MAX_QUERY_CHARS and question == part["text"][: len(question)]


def test_form_text_fields_state_the_length_the_server_takes(client, spec):
    """The multipart forms' free-text fields say in the schema how long they may be, as the JSON bodies'
    do (schemathesis' "valid data accepted" would otherwise meet a 422 for a schema-valid field)."""
    from service.limits import MAX_PATH_CHARS, MAX_TAG_CHARS, MAX_TAGS
    from service.schemas import MAX_STOP_CHARS, MAX_STOPS

    def form(path: str) -> dict:
        body = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        if "$ref" in body:
            body = spec["components"]["schemas"][body["$ref"].split("/")[-1]]
        return body["properties"]

    def max_length(field: dict) -> int | None:
        return next((b["maxLength"] for b in field.get("anyOf", [field]) if "maxLength" in b), None)

    upload = form("/search/upload")
    assert max_length(upload["path_prefix"]) == MAX_PATH_CHARS
    assert max_length(upload["tags"]) == MAX_TAGS * (MAX_TAG_CHARS + 1)
    assert max_length(form("/generate")["stop"]) == MAX_STOPS * (MAX_STOP_CHARS + 1)
    png = {"file": ("q.png", image_bytes(), "image/png")}
    for field, value in [("path_prefix", "/" + "a" * MAX_PATH_CHARS), ("tags", "a" * (MAX_TAG_CHARS + 1))]:
        assert_4xx(client.post("/search/upload", files=png, data={field: value}))
    assert client.post("/search/upload", files=png, data={"path_prefix": "/" + "a" * 100}).status_code == 200
    commas = "," * (MAX_STOPS * (MAX_STOP_CHARS + 1) + 1)  # no stop string in it, but over the stated length
    assert_4xx(client.post("/generate", files=png, data={"stop": commas}))
