"""The /search hot path: the fast path in front of the app, LeanRoute, the pydantic-core JSON answer,
the vector check, metrics, row reads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import FakeEmbedder
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi import routing as fastapi_routing
from fastapi.testclient import TestClient

from index.collection import Collection
from index.types import Item
from service import fastpath
from service.app import create_app
from service.metrics import Metrics
from service.responses import FastJSONResponse
from service.routing import LeanRoute
from service.search import embed_query
from service.settings import Settings

TEXTS = ["red apples in a bowl", "a blue sky over hills", "green grass after rain", "a red sports car"]


@pytest.fixture()
def solved(monkeypatch) -> list[str]:
    """Paths whose request went through FastAPI's dependency solver."""
    calls: list[str] = []
    real = fastapi_routing.solve_dependencies

    async def counting(*, request, **kw):
        calls.append(request.url.path)
        return await real(request=request, **kw)

    monkeypatch.setattr(fastapi_routing, "solve_dependencies", counting)
    return calls


def _client(tmp_path, **settings) -> TestClient:
    return TestClient(create_app(Settings(collection=tmp_path / "c", **settings), embedder=FakeEmbedder()))


def _add_texts(client: TestClient, headers: dict[str, str] | None = None) -> list[int]:
    ids = []
    for text in TEXTS:
        resp = client.post("/items/text", json={"text": text, "tags": ["t"]}, headers=headers)
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["id"])
    return ids


def test_search_skips_the_dependency_solver_without_keys(tmp_path, solved):
    with _client(tmp_path) as c:
        ids = _add_texts(c)
        solved.clear()
        resp = c.post("/search", json={"query": "red apples", "k": 2})
        assert resp.status_code == 200 and resp.json()["results"][0]["id"] == ids[0]
        assert solved == []  # the lean handler answered
        vec = FakeEmbedder().encode_text(["red sports car"])[0]
        by_vec = c.post("/search", json={"vector": vec.tolist(), "k": 1}).json()
        assert by_vec["results"][0]["id"] == ids[3] and by_vec["query"] == {"type": "vector", "value": None}
        bad = c.post("/search", json={"query": "x", "k": "many"})
        assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("k:")
        assert c.post("/search", json={"item_id": 999999}).status_code == 404
        assert solved == []
        assert c.get("/items").status_code == 200 and solved == ["/items"]  # other routes: FastAPI's handler
        text = c.get("/metrics").text
        assert 'route="/search",status="200"' in text and 'route="/search",status="422"' in text


def test_search_with_keys_keeps_the_key_check(tmp_path, solved):
    with _client(tmp_path, api_keys=["k1"]) as c:
        key = {"X-API-Key": "k1"}
        ids = _add_texts(c, key)
        solved.clear()
        denied = c.post("/search", json={"query": "red apples"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
        assert c.post("/search", json={"query": "red apples"}, headers={"X-API-Key": "no"}).status_code == 401
        ok = c.post("/search", json={"query": "red apples", "k": 1}, headers=key)
        assert ok.status_code == 200 and ok.json()["results"][0]["id"] == ids[0]
        assert solved.count("/search") == 2  # the app's key check refused both; the fast path took the third
        as_bearer = {"Authorization": "Bearer k1"}
        bearer = c.post("/search", json={"query": "red apples", "k": 1}, headers=as_bearer)
        assert bearer.status_code == 200 and solved.count("/search") == 2
        for wrong in ("Basic k1", "Bearer k2", "Bearer", "k1"):
            resp = c.post("/search", json={"query": "red"}, headers={"Authorization": wrong})
            assert resp.status_code == 401, wrong
        assert solved.count("/search") == 6  # each refusal came from the app's own key check
        c.app.fast_search.enabled = False
        ok = c.post("/search", json={"query": "red apples", "k": 1}, headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200 and ok.json()["results"][0]["id"] == ids[0]
        assert solved.count("/search") == 7  # without the fast path the dependency (the key check) runs


def test_openapi_keeps_the_search_operation(tmp_path):
    with _client(tmp_path) as c:
        op = c.get("/openapi.json").json()["paths"]["/search"]["post"]
    assert op["operationId"] == "search_json_search_post" and op["tags"] == ["search"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/SearchRequest")
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SearchResponse")
    assert {"401", "404", "422"} <= set(op["responses"])


def test_lean_route_falls_back_for_parameters_and_dependencies(solved):
    async def lean(request: Request) -> FastJSONResponse:
        return FastJSONResponse({"path": request.url.path})

    async def with_param(request: Request, n: int = 1) -> FastJSONResponse:
        return FastJSONResponse({"n": n})

    async def not_a_response(request: Request) -> dict:
        return {"x": 1}

    async def marker(request: Request) -> None:
        request.state.marked = True

    router = APIRouter(route_class=LeanRoute)
    router.add_api_route("/lean", lean, methods=["GET"])
    router.add_api_route("/param", with_param, methods=["GET"])
    router.add_api_route("/dict", not_a_response, methods=["GET"])
    app = FastAPI()
    app.include_router(router)
    app.include_router(router, prefix="/dep", dependencies=[Depends(marker)])
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/lean").json() == {"path": "/lean"} and solved == []
        assert c.get("/param", params={"n": 3}).json() == {"n": 3} and solved == ["/param"]
        assert c.get("/dep/lean").json() == {"path": "/dep/lean"} and solved[-1] == "/dep/lean"
        assert c.get("/dict").status_code == 500  # a lean endpoint must answer a Response


def test_fast_json_matches_starlette_json():
    from starlette.responses import JSONResponse

    content = {
        "results": [{"id": 3, "score": 0.123457, "caption": "café ☕ \u2028", "tags": ["a"], "w": None}],
        "took_ms": 0.25,
        "query": {"type": "text", "value": "x"},
    }
    fast = FastJSONResponse(content)
    assert fast.body == JSONResponse(content).body
    assert fast.headers["content-type"] == "application/json"
    assert json.loads(FastJSONResponse({"s": math.nan}).body) == {"s": None}  # valid JSON, never NaN


def test_vector_query_check_and_normalisation(tmp_path):
    coll = Collection.create(tmp_path / "v", dim=4, embedder_id="fake:0001", index_spec="Flat")
    try:
        vec, query = embed_query(coll, FakeEmbedder(), vector=[3.0, 0.0, 4.0, 0.0])
        assert vec.dtype == np.float32 and query.kind == "vector"
        np.testing.assert_allclose(vec, [0.6, 0.0, 0.8, 0.0], rtol=1e-6)
        big, _ = embed_query(coll, FakeEmbedder(), vector=[3e30, 0.0, 4e30, 0.0])  # a float32 norm overflows
        np.testing.assert_allclose(big, [0.6, 0.0, 0.8, 0.0], rtol=1e-6)
        for bad in ([1.0, 2.0], [1.0, math.nan, 0.0, 0.0], [math.inf, 0.0, 0.0, 0.0], [1e39, 0.0, 0.0, 0.0]):
            with pytest.raises(ValueError, match="finite numbers"), np.errstate(over="ignore"):
                embed_query(coll, FakeEmbedder(), vector=bad)
        with pytest.raises(ValueError, match="all zeros"):
            embed_query(coll, FakeEmbedder(), vector=[0.0, 0.0, 0.0, 0.0])
    finally:
        coll.close()


def test_metrics_observe_reuses_label_children():
    m = Metrics()
    for status in (200, 200, 422):
        m.observe("POST", "/search", status, 0.002)
    assert len(m._latency_children) == 2
    text = m.render(None).decode()
    assert 'mm_http_request_duration_seconds_count{method="POST",route="/search",status="200"} 2.0' in text
    assert 'mm_http_request_duration_seconds_count{method="POST",route="/search",status="422"} 1.0' in text


def test_rows_read_fresh_after_writes(tmp_path):
    coll = Collection.create(tmp_path / "r", dim=4, embedder_id="fake:0001", index_spec="Flat")
    try:
        vecs = np.eye(4, dtype=np.float32)[:3]
        items = [Item(id=0, modality="text", uri="", sha256=f"{i:064x}", caption=f"c{i}") for i in range(3)]
        ids = coll.add(vecs, items)
        first = coll.search(vecs[0], k=3)[0]
        assert [h.item.tags for h in first] == [[], [], []] and first[0].item.extra == {}
        first[0].item.tags.append("mutated")  # parsed rows never share their lists
        assert coll.get(ids[1]).tags == [] and coll.get(ids[0]).tags == []
        coll.update_metadata(ids[0], tags=["x", "y"], caption="new")
        coll.delete([ids[1]])
        hits = coll.search(vecs[0], k=3)[0]
        assert [h.id for h in hits] == [ids[0], ids[2]]
        assert hits[0].item.tags == ["x", "y"] and hits[0].item.caption == "new"
        reader = Collection.open(tmp_path / "r", readonly=True)  # another connection sees the same
        try:
            assert reader.get(ids[0]).tags == ["x", "y"] and reader.get(ids[1]) is None
        finally:
            reader.close()
    finally:
        coll.close()


@pytest.fixture()
def full_app(monkeypatch) -> list[str]:
    """Paths of the requests that reached the full FastAPI app (not answered by the fast path)."""
    calls: list[str] = []
    real = FastAPI.__call__

    async def counting(self, scope, receive, send):
        if scope["type"] == "http":
            calls.append(scope["path"])
        await real(self, scope, receive, send)

    monkeypatch.setattr(FastAPI, "__call__", counting)
    return calls


def _without_time(resp) -> tuple[int, dict]:
    body = resp.json()
    body.pop("took_ms", None)
    return resp.status_code, body


def test_fast_path_answers_as_the_route_does(tmp_path, full_app):
    with _client(tmp_path) as c:
        ids = _add_texts(c)
        vec = FakeEmbedder().encode_text(["a blue sky"])[0].tolist()
        bodies = [
            {"query": "red apples", "k": 3},
            {"query": "red", "k": 2, "offset": 1, "modalities": ["text"], "filters": {"tags": ["t"]}},
            {"vector": vec, "k": 4},
            {"item_id": ids[0], "k": 2},
            {"query": "red", "filters": {"tags": ["absent"]}},
        ]
        full_app.clear()
        fast = [_without_time(c.post("/search", json=b)) for b in bodies]
        assert full_app == []  # all answered in front of the app
        metrics = c.get("/metrics").text
        assert 'route="/search",status="200"} 5.0' in metrics
        c.app.fast_search.enabled = False
        full_app.clear()
        slow = [_without_time(c.post("/search", json=b)) for b in bodies]
        assert full_app == ["/search"] * len(bodies)
    assert fast == slow
    assert [r["id"] for r in fast[0][1]["results"]][:1] == [ids[0]] and fast[4][1]["results"] == []
    assert ids[0] not in [r["id"] for r in fast[3][1]["results"]]  # more-like-this excludes the item


def test_fast_path_hands_failures_to_the_app(tmp_path, full_app):
    bad = [
        b'{"query": "x", "k": "many"}',  # 422 field
        b'{"query": "x", "surprise": 1}',  # 422 extra field
        b'{"query": "x"',  # 422 malformed JSON
        b'{"item_id": 999999}',  # 404
        b'{"vector": [1.0, 2.0]}',  # 422 wrong dimension
        b'{"query": "x", "filters": {"since": "not a date"}}',  # 422 filter
    ]

    def answers(c: TestClient) -> list[tuple[int, dict]]:
        replies = [c.post("/search", content=b, headers={"content-type": "application/json"}) for b in bad]
        return [(r.status_code, r.json()) for r in replies]

    with _client(tmp_path) as c:
        _add_texts(c)
        full_app.clear()
        fast = answers(c)
        assert full_app == ["/search"] * len(bad)  # each handed over, with its body replayed
        c.app.fast_search.enabled = False
        slow = answers(c)
        metrics = c.get("/metrics").text
    assert fast == slow
    assert [status for status, _ in fast] == [422, 422, 422, 404, 422, 422]
    assert all(body["error"]["code"] in ("validation_error", "not_found") for _, body in fast)
    assert 'route="/search",status="404"} 2.0' in metrics and 'route="/search",status="422"} 10.0' in metrics


def test_fast_path_leaves_what_it_cannot_take_to_the_app(tmp_path, full_app, monkeypatch):
    reads: list[int] = []
    real_read = fastpath._read_body

    async def counting_read(receive, limit):
        reads.append(limit)
        return await real_read(receive, limit)

    monkeypatch.setattr(fastpath, "_read_body", counting_read)
    with _client(tmp_path, max_upload_mb=0.001) as c:  # a 1,048-byte body limit
        ids = _add_texts(c)
        full_app.clear()
        chunked = c.post("/search", content=iter([b'{"query": ', b'"red apples", "k": 1}']))
        assert chunked.status_code == 200 and chunked.json()["results"][0]["id"] == ids[0]
        big = c.post("/search", json={"query": "red " * 400})
        assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
        assert full_app == ["/search", "/search"] and reads == []  # neither body was read by the fast path
    with _client(tmp_path, fast_search=False) as c:  # MM_FAST_SEARCH=false
        full_app.clear()
        assert c.post("/search", json={"query": "red apples", "k": 1}).status_code == 200
        assert full_app == ["/search"]
    with _client(tmp_path, cors_origins=["http://example.org"]) as c:  # CORS headers come from the app
        full_app.clear()
        resp = c.post("/search", json={"query": "red", "k": 1}, headers={"Origin": "http://example.org"})
        assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "http://example.org"
        assert full_app == ["/search"]


def _asgi_post(c: TestClient, messages: list[dict], length: int) -> tuple[str | None, list[int]]:
    """POST /search straight into the app with these receive messages: (exception raised, statuses sent)."""
    sent: list[int] = []

    async def run() -> str | None:
        pending = list(messages)

        async def receive() -> dict:
            return pending.pop(0) if pending else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                sent.append(message["status"])

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/search", "raw_path": b"/search", "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
        }  # fmt: skip
        try:
            await c.app(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - the outcome is compared, whatever it is
            return type(exc).__name__
        return None

    return c.portal.call(run), sent


def test_fast_path_hands_over_long_bodies_and_disconnects_as_read(tmp_path, full_app):
    longer = [  # declares 10 bytes, sends 1,600: past the 1,048-byte limit while it is read
        {"type": "http.request", "body": b"x" * 800, "more_body": True},
        {"type": "http.request", "body": b"x" * 800, "more_body": False},
    ]
    gone = [{"type": "http.request", "body": b'{"query": ', "more_body": True}, {"type": "http.disconnect"}]
    with _client(tmp_path, max_upload_mb=0.001) as c:
        _add_texts(c)
        full_app.clear()
        fast = [_asgi_post(c, longer, 10), _asgi_post(c, gone, 20)]
        assert full_app == ["/search", "/search"]  # both handed over with what had been read
        c.app.fast_search.enabled = False
        slow = [_asgi_post(c, longer, 10), _asgi_post(c, gone, 20)]
        metrics = c.get("/metrics").text
    assert fast == slow
    assert fast[0] == (None, [413])
    assert 'route="/search",status="413"} 2.0' in metrics
