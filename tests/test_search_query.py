"""One search query (``service.schemas.SearchQuery``) and one answer (``service.search.answer``): each rule
of a query checked at its one place, and every entry point (REST route, fast path, WebSocket, CLI,
generation) giving the same hits for the same query."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeEmbedder, image_bytes
from fastapi.testclient import TestClient
from pydantic import ValidationError

from index.collection import Collection
from index.types import Filter
from service.app import create_app
from service.schemas import (
    MAX_K,
    MAX_OFFSET,
    QueryMedia,
    SearchFilters,
    SearchQuery,
    SearchRequest,
    SearchResponse,
    SearchResult,
    error_message,
)
from service.search import NotFound, answer
from service.settings import Settings

TEXTS = [
    "red apples in a bowl",
    "a blue ocean wave",
    "green grass and red apples",
    "a red sports car",
    "the ocean at night",
]


def refused(**fields) -> str:
    with pytest.raises(ValidationError) as exc:
        SearchQuery(**fields)
    return error_message(exc.value)


# -- the rules, each at its one place ---------------------------------------------------------------


def test_exactly_one_kind_of_query():
    assert "exactly one" in refused()
    assert "exactly one" in refused(query="x", item_id=3)
    assert "exactly one" in refused(vector=[1.0], media=QueryMedia("image", "/tmp/q.png"))
    assert SearchQuery(query="x").kind == "text"
    assert SearchQuery(item_id=3).kind == "item"
    assert SearchQuery(vector=[1.0, 0.0]).kind == "vector"
    assert SearchQuery(media=QueryMedia("audio", "/tmp/q.wav")).kind == "audio"


def test_k_and_offset_bounds():
    assert SearchQuery(query="x", k=MAX_K).k == MAX_K
    assert refused(query="x", k=MAX_K + 1).startswith("k:")
    assert refused(query="x", k=0).startswith("k:")
    assert SearchQuery(query="x", offset=MAX_OFFSET).offset == MAX_OFFSET
    assert refused(query="x", offset=MAX_OFFSET + 1).startswith("offset:")
    assert refused(query="x", offset=-1).startswith("offset:")


def test_text_must_not_be_blank():
    assert refused(query="   ").startswith("query:")


def test_time_span_is_read_and_ordered():
    f = SearchFilters(since="2024-01-01", until="2024-01-02T00:00:00Z")
    assert f.span == (1704067200.0, 1704153600.0)  # naive ISO means UTC
    assert SearchFilters(since=5).span == (5.0, None)
    with pytest.raises(ValidationError, match="since is after until"):
        SearchFilters(since=10, until=5)
    with pytest.raises(ValidationError, match="finite"):
        SearchFilters(since=math.inf)
    with pytest.raises(ValidationError):
        SearchFilters(until="yesterday")


def test_the_time_span_rule_is_written_once():
    """``since <= until`` is ``index.types.check_span``: the index's Filter and the query's filters refuse an
    inverted span when made, in the same words (the index no longer checks it again at search time)."""
    with pytest.raises(ValueError, match="^since is after until: nothing can match$"):
        Filter(since=10.0, until=5.0)
    with pytest.raises(ValidationError, match="since is after until: nothing can match"):
        SearchFilters(since=10, until=5)
    assert Filter(since=5.0, until=5.0).until == 5.0  # a one-second span is a span


def test_filter_carries_modalities_tags_path_span_and_the_excluded_item():
    q = SearchQuery(
        item_id=7,
        modalities=["image", "audio", "image"],
        filters={"tags": ["a", ""], "path_prefix": "/data", "since": 1, "until": 2},
    )
    f = q.filter
    assert f is not None
    assert f.modalities == ["image", "audio"] and f.tags == ["a"] and f.path_prefix == "/data"
    assert (f.since, f.until) == (1.0, 2.0)
    assert f.exclude_ids == [7]  # more-like-this never returns the item itself
    assert SearchQuery(query="x").filter is None  # nothing filters
    assert SearchQuery(query="x", filters={"tags": [""], "path_prefix": ""}).filter is None


def test_vector_is_checked_and_normalised():
    np.testing.assert_allclose(SearchQuery(vector=[3.0, 0.0, 4.0]).unit, [0.6, 0.0, 0.8], rtol=1e-6)
    assert SearchQuery(vector=[3.0, 0.0, 4.0]).unit.dtype == np.float32
    with np.errstate(over="ignore"):
        assert "finite" in refused(vector=[1e39, 0.0])  # overflows float32
    assert "finite" in refused(vector=[math.nan, 1.0])
    assert "all zeros" in refused(vector=[0.0, 0.0])


def test_modes_hybrid_by_default_and_keyword_needs_words():
    assert SearchQuery(query="x").mode == "hybrid"
    assert SearchQuery(query="x", mode="keyword").mode == "keyword"
    assert SearchQuery(item_id=3, mode="vector").mode == "vector"
    assert "give a text query" in refused(item_id=3, mode="keyword")
    assert refused(query="x", mode="fuzzy").startswith("mode:")


def test_no_json_or_message_can_name_a_server_file():
    evil = {"modality": "image", "path": "/etc/passwd", "name": "x"}
    with pytest.raises(ValidationError):
        SearchRequest.model_validate_json(json.dumps({"media": evil}))
    with pytest.raises(ValidationError):
        SearchRequest.model_validate({"media": evil})  # a WebSocket message is validated from a dict
    assert "media" not in SearchRequest.model_json_schema()["properties"]


def test_echo_and_result_shape():
    assert SearchQuery(query="a frog").echo() == {"type": "text", "value": "a frog"}
    assert SearchQuery(item_id=4).echo() == {"type": "item", "value": 4}
    assert SearchQuery(vector=[1.0]).echo() == {"type": "vector", "value": None}
    media = QueryMedia("image", "/tmp/mm-q123.png", "cat.png")
    assert SearchQuery(media=media).echo() == {"type": "image", "value": "cat.png"}
    # the response model's results are the one TypedDict hit_to_dict builds
    assert SearchResponse.model_fields["results"].annotation == list[SearchResult]


def test_answer_checks_what_needs_the_collection(tmp_path):
    coll = Collection.create(tmp_path / "c", dim=FakeEmbedder.dim, embedder_id="fake:0001", index_spec="Flat")
    try:
        with pytest.raises(ValueError, match=f"{FakeEmbedder.dim} finite numbers"):
            answer(SearchQuery(vector=[1.0, 2.0]), FakeEmbedder(), coll)
        with pytest.raises(NotFound):
            answer(SearchQuery(item_id=12345), FakeEmbedder(), coll)
    finally:
        coll.close()


# -- every entry point answers alike ------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    settings = Settings(collection=tmp_path_factory.mktemp("parity") / "coll")
    with TestClient(create_app(settings, embedder=FakeEmbedder())) as client:
        ids = []
        for text in TEXTS:
            resp = client.post("/items/text", json={"text": text, "tags": ["t"]})
            assert resp.status_code == 201, resp.text
            ids.append(resp.json()["id"])
        image = client.post("/items", files={"file": ("red.png", image_bytes((220, 30, 30)), "image/png")})
        assert image.status_code == 201, image.text
        client.app.state.collection.save()  # the CLI opens it from disk
        client.ids = ids
        yield client


def via_route(client: TestClient, body: dict, fast: bool) -> list[tuple[int, float]]:
    """POST /search answered by the fast path (``fast``) or by the route behind it."""
    from service import fastpath as module

    fastpath, answered = client.app.fast_search, []
    real = module.answer_async

    async def spy(*args, **kw):
        answered.append(1)
        return await real(*args, **kw)

    was, fastpath.enabled, module.answer_async = fastpath.enabled, fast, spy
    try:
        resp = client.post("/search", json=body)
    finally:
        fastpath.enabled, module.answer_async = was, real
    assert resp.status_code == 200, resp.text
    assert len(answered) == (1 if fast else 0)  # the path asked for is the one that answered
    return [(r["id"], r["score"]) for r in resp.json()["results"]]


def via_ws(client: TestClient, body: dict) -> list[tuple[int, float]]:
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "search", "id": "p", **body})
        msg = ws.receive_json()
    assert msg["type"] == "results", msg
    return [(r["id"], r["score"]) for r in msg["results"]]


def via_cli(client: TestClient, argv: list[str], monkeypatch, capsys) -> list[tuple[int, float]]:
    from service import embedding
    from service.cli import main

    monkeypatch.setattr(embedding, "load_embedder", lambda name="default": client.app.state.embedder)
    coll = str(client.app.state.settings.collection)
    assert main(["search", *argv, "--collection", coll, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return [(r["id"], r["score"]) for r in out["results"]]


class CitesAll:
    """A backend that cites every item it is given: the retrieval under test, not an answer's rules (the
    real extractive backend cites only the items its answer names)."""

    name = "extractive"
    max_items = None

    def stream(self, question, hits, **params):
        return iter(["ok"])


def via_generation(client: TestClient, body: dict) -> list[tuple[int, float]]:
    from service.generation import generators_of

    made = generators_of(client.app)._made
    saved = made.get("extractive")
    made["extractive"] = CitesAll()
    try:
        resp = client.post("/generate", json={**body, "backend": "extractive"})
    finally:
        made.pop("extractive")
        if saved is not None:
            made["extractive"] = saved
    assert resp.status_code == 200, resp.text
    return [(c["id"], c["score"]) for c in resp.json()["citations"]]


def test_every_entry_point_gives_the_same_hits(served, monkeypatch, capsys):
    body = {"query": "a blue ocean wave", "k": 3, "modalities": ["text"]}
    expected = via_route(served, body, fast=False)
    assert len(expected) == 3 and expected[0][0] == served.ids[1]
    assert via_route(served, body, fast=True) == expected
    assert via_ws(served, body) == expected
    argv = ["a blue ocean wave", "-k", "3", "--modality", "text"]
    assert via_cli(served, argv, monkeypatch, capsys) == expected
    # generation's retrieval: the same search, of the question's content words (GenerateParams.retrieval)
    from service.generation.prompts import retrieval_text

    words = {**body, "query": retrieval_text(body["query"])}
    assert words["query"] == "blue ocean wave"
    assert via_generation(served, body) == via_route(served, words, fast=False)


def test_more_like_this_excludes_the_item_everywhere(served, monkeypatch, capsys):
    target = served.ids[1]
    body = {"item_id": target, "k": 10}
    expected = via_route(served, body, fast=False)
    assert target not in [i for i, _ in expected] and len(expected) == len(TEXTS)  # 4 texts + the image
    assert via_route(served, body, fast=True) == expected
    assert via_ws(served, body) == expected
    assert via_cli(served, ["--item", str(target), "-k", "10"], monkeypatch, capsys) == expected


def test_uploaded_and_cli_files_search_alike(served, monkeypatch, capsys, tmp_path):
    png = image_bytes((220, 30, 30))
    resp = served.post("/search/upload", files={"file": ("q.png", png, "image/png")}, data={"k": "2"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["query"] == {"type": "image", "value": "q.png"}
    uploaded = [(r["id"], r["score"]) for r in resp.json()["results"]]
    path = Path(tmp_path / "q.png")
    path.write_bytes(png)
    assert via_cli(served, ["--image", str(path), "-k", "2"], monkeypatch, capsys) == uploaded


def test_a_bad_k_is_refused_alike(served, monkeypatch, capsys):
    from service.cli import main

    too_many = {"query": "x", "k": MAX_K + 1}
    assert served.post("/search", json=too_many).json()["error"]["message"].startswith("k:")
    with served.websocket_connect("/ws") as ws:
        ws.send_json({"type": "search", "id": 1, **too_many})
        err = ws.receive_json()
    assert err["type"] == "error" and err["code"] == "validation_error" and err["message"].startswith("k:")
    coll = str(served.app.state.settings.collection)
    assert main(["search", "x", "-k", str(MAX_K + 1), "--collection", coll]) == 2
    assert "k:" in capsys.readouterr().err


def test_a_bad_mode_is_refused_alike(served, capsys):
    """The modes are SearchQuery's list alone: the CLI refuses an unknown one in the REST API's words."""
    from service.cli import main

    refusal = served.post("/search", json={"query": "x", "mode": "fuzzy"}).json()["error"]["message"]
    assert refusal.startswith("mode:") and "keyword" in refusal
    coll = str(served.app.state.settings.collection)
    assert main(["search", "x", "--mode", "fuzzy", "--collection", coll]) == 2
    assert capsys.readouterr().err.strip() == f"mm: error: {refusal}"


@pytest.mark.parametrize("mode", ["keyword", "hybrid", "vector"])
def test_every_mode_reaches_every_entry_point_alike(served, monkeypatch, capsys, mode):
    body = {"query": "ocean wave", "k": 5, "mode": mode}
    expected = via_route(served, body, fast=False)
    assert expected, "the words 'ocean wave' are in a stored caption"
    assert via_route(served, body, fast=True) == expected
    assert via_ws(served, body) == expected
    argv = ["ocean wave", "-k", "5", "--mode", mode]
    assert via_cli(served, argv, monkeypatch, capsys) == expected
    if mode == "keyword":  # only items whose words matched
        results = served.post("/search", json=body).json()["results"]
        assert all(r["lexical_score"] is not None and r["score_raw"] is None for r in results)
