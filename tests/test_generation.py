"""Grounded generation: backends, SSE, WebSocket, the OpenAI-compatible API and `mm ask`."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import image_bytes, wait_job
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service.app import create_app
from service.generation import (
    ExtractiveGenerator,
    GGUFGenerator,
    LocalGenerator,
    OpenAIGenerator,
    iterate_in_thread,
    with_stop,
)
from service.generation.backends.extractive import Rules
from service.routers.generate import generators_of
from service.settings import Settings

QUESTION = "a red circle"
ANY_CONCEPT = Rules(item_min=-1.0, answer_min=-1.0, margin=0.0)


def cited(answer: str) -> list[int]:
    return sorted({int(n) for n in re.findall(r"\[(\d+)\]", answer)})


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, embedder):
    """A tiny LM with random weights whose prefix width is the embedder's."""
    import dataclasses

    import torch

    from mm.lm import GroundedLM, resolve_lm, save_lm

    cfg, _ = resolve_lm("lm_tiny")
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lm")
    return save_lm(GroundedLM(dataclasses.replace(cfg, embed_dim=embedder.dim)), out)


@pytest.fixture(scope="module")
def client(tmp_path_factory, embedder, media_root, lm_dir):
    settings = Settings(
        collection=tmp_path_factory.mktemp("gen") / "coll",
        allowed_roots=[media_root],
        lm_path=lm_dir,
        # no GGUF file: the packaged model (the llm extra) is loaded only by tests/test_gguf.py's slow tests
        gguf_path=tmp_path_factory.mktemp("nogguf") / "absent.gguf",
    )
    with TestClient(create_app(settings, embedder=embedder)) as c:
        wait_job(c, c.post("/ingest", json={"path": str(media_root)}).json()["id"])
        # the fake embedder's scores are not calibrated: the API tests answer from the best concept
        # whatever its score (the grounding rules themselves are tested on hand-made hits below)
        generators_of(c.app)._made["extractive"] = ExtractiveGenerator(rules=ANY_CONCEPT)
        yield c


@pytest.fixture
def backends(client):
    """The app's backend registry; entries a test replaces are restored afterwards."""
    gens = generators_of(client.app)
    saved = dict(gens._made)
    yield gens._made
    gens._made.clear()
    gens._made.update(saved)


def sse_events(text: str) -> list[tuple[str, object]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


class SlowGenerator:
    """Yields many pieces slowly and records whether it was closed early."""

    name = "gguf"
    max_items = None

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.made = 0

    def stream(self, question, hits, *, max_tokens, temperature, stop) -> Iterator[str]:
        def pieces():
            try:
                for i in range(200):
                    self.made += 1
                    time.sleep(0.02)
                    yield f" w{i}"
            finally:
                self.closed.set()

        return pieces()


# ----------------------------------------------------------------------------------------------------
# backends


def test_extractive_cites_exactly_what_it_names_and_streams_words(client):
    body = client.post("/generate", json={"query": QUESTION, "k": 3}).json()
    assert body["backend"] == "extractive"
    assert 1 <= len(body["citations"]) <= 3
    assert {"id", "modality", "score", "caption"} <= set(body["citations"][0])
    assert cited(body["answer"]) == list(range(1, len(body["citations"]) + 1))
    first = body["citations"][0]["caption"].split(".")[0].strip().lower()
    assert body["answer"].lower().startswith(first)  # it names the concept its citations carry


def test_with_stop_cuts_and_closes_the_source():
    closed = []

    def src():
        try:
            yield from ["ab", "c[", "2]", "zz"]
        finally:
            closed.append(True)

    assert "".join(with_stop(src(), ["[2]"])) == "abc"
    assert closed == [True]


def test_sse_streams_tokens_then_citations_then_done(client):
    plain = client.post("/generate", json={"query": QUESTION, "k": 2}).json()
    resp = client.post("/generate", json={"query": QUESTION, "k": 2, "stream": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    kinds = [e for e, _ in events]
    assert kinds[-2:] == ["citations", "done"] and set(kinds[:-2]) == {"token"}
    tokens = [d["text"] for e, d in events if e == "token"]
    assert len(tokens) > 3
    assert "".join(tokens) == plain["answer"]
    assert events[-2][1] == plain["citations"]
    assert events[-1][1] == {"backend": "extractive"}


def test_stop_strings(client):
    full = client.post("/generate", json={"query": QUESTION, "k": 3}).json()["answer"]
    body = client.post("/generate", json={"query": QUESTION, "k": 3, "stop": ["[1]"]}).json()
    assert "[1]" in full and body["answer"] == full[: full.index("[1]")]


def test_upload_query(client):
    files = {"file": ("q.png", image_bytes((220, 30, 30), "circle"), "image/png")}
    resp = client.post("/generate", files=files, data={"k": "2", "question": "what is this?"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert 1 <= len(body["citations"]) <= 2 and cited(body["answer"]) == list(
        range(1, len(body["citations"]) + 1)
    )


def test_local_backend_streams_with_citations(client):
    resp = client.post(
        "/generate", json={"query": QUESTION, "k": 5, "backend": "local", "stream": True, "max_tokens": 12}
    )
    assert resp.status_code == 200, resp.text
    events = sse_events(resp.text)
    assert events[-1] == ("done", {"backend": "local"})
    assert 1 <= len(events[-2][1]) <= 3  # the tiny LM takes at most prefix_len = 3 items
    body = client.post("/generate", json={"query": QUESTION, "backend": "local", "max_tokens": 12}).json()
    assert body["answer"] == "".join(d["text"] for e, d in events if e == "token")  # greedy: same text


def assert_503(resp) -> str:
    assert resp.status_code == 503, resp.text
    err = resp.json()["error"]
    assert err["code"] == "generator_unavailable"
    return err["message"]


def test_local_model_missing_is_503(client, backends, tmp_path):
    backends["local"] = LocalGenerator(tmp_path / "nothing", lambda i: None)
    msg = assert_503(client.post("/generate", json={"query": QUESTION, "backend": "local"}))
    assert "no LM checkpoint" in msg


def test_openai_endpoint_down_is_503(client, backends):
    backends["openai"] = OpenAIGenerator("http://127.0.0.1:9/v1", None, "m", timeout=2.0)
    assert_503(client.post("/generate", json={"query": QUESTION, "backend": "openai"}))
    assert_503(client.post("/generate", json={"query": QUESTION, "backend": "openai", "stream": True}))


def test_openai_backend_not_configured_is_503(client, backends):
    backends["openai"] = OpenAIGenerator(None, None, "m")
    assert "MM_OPENAI_BASE_URL" in assert_503(
        client.post("/generate", json={"query": QUESTION, "backend": "openai"})
    )


def test_openai_backend_streams_from_endpoint(client, backends):
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        seen["auth"] = request.headers.get("authorization")
        chunks = [{"choices": [{"delta": {"content": p}}]} for p in ["A red", " circle", " [1]."]]
        text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    backends["openai"] = OpenAIGenerator("http://llm/v1", "sk-x", "m", transport=httpx.MockTransport(handler))
    body = client.post("/generate", json={"query": QUESTION, "backend": "openai", "k": 2}).json()
    assert body["answer"] == "A red circle [1]."
    assert seen["auth"] == "Bearer sk-x" and seen["body"]["stream"] is True
    assert (
        "[1]" in seen["body"]["messages"][-1]["content"] and "[2]" in seen["body"]["messages"][-1]["content"]
    )


def test_gguf_not_installed_is_503(client, backends, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails as if not installed
    backends["gguf"] = GGUFGenerator(None)
    assert "llama-cpp-python is not installed: pip install -e '.[llm]'" in assert_503(
        client.post("/generate", json={"query": QUESTION, "backend": "gguf"})
    )


def test_gguf_missing_model_file_is_503(client, backends):
    pytest.importorskip("llama_cpp")  # the `llm` extra (make test installs it)
    backends["gguf"] = GGUFGenerator("/nonexistent.gguf")
    assert "no GGUF model file at /nonexistent.gguf (MM_GGUF_PATH)" in assert_503(
        client.post("/generate", json={"query": QUESTION, "backend": "gguf"})
    )


def test_iterate_in_thread_starts_the_source_in_its_thread():
    import asyncio

    where = []

    def start() -> Iterator[str]:
        where.append(threading.current_thread().name)
        return iter(["a", "b"])

    def broken() -> Iterator[str]:
        raise ValueError("bad stop")

    async def collect(source) -> list[str]:
        return [p async for p in iterate_in_thread(source)]

    assert asyncio.run(collect(start)) == ["a", "b"]
    assert where == ["mm-generate"]  # made in the generation thread, not the event loop's
    with pytest.raises(ValueError, match="bad stop"):
        asyncio.run(collect(broken))


def test_bad_parameters_are_4xx(client):
    for body in (
        {"query": QUESTION, "backend": "nope"},
        {"query": QUESTION, "temperature": 5},
        {"query": ""},
        {"query": QUESTION, "k": 0},
        {"query": QUESTION, "stop": [""]},
    ):
        resp = client.post("/generate", json=body)
        assert resp.status_code == 422, (body, resp.text)
        assert resp.json()["error"]["message"]
    assert client.post("/generate", files={"file": ("x.txt", b"hi", "text/plain")}).status_code in (415, 422)
    # JSON and form bodies are validated alike (service.body): the message names the field
    as_json = client.post("/generate", json={"query": QUESTION, "k": 0})
    assert as_json.json()["error"]["message"].startswith("k:")
    form = client.post("/generate", files={"file": ("a.png", b"x", "image/png")}, data={"k": "zero"})
    assert form.status_code == 422 and form.json()["error"]["message"].startswith("k:")


def test_generate_request_body_is_in_the_openapi_schema(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/generate"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    name = body["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert {"query", "k", "backend", "stream"} <= set(spec["components"]["schemas"][name]["properties"])


# ----------------------------------------------------------------------------------------------------
# WebSocket


def ws_collect(ws, rid) -> list[dict]:
    out = []
    while True:
        msg = ws.receive_json()
        assert msg["id"] == rid, msg
        out.append(msg)
        if msg["type"] in ("done", "error", "results"):
            return out


def test_ws_search_and_generate_on_one_connection(client):
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "search", "id": "s1", "query": QUESTION, "k": 3})
        (res,) = ws_collect(ws, "s1")
        assert res["type"] == "results" and len(res["results"]) == 3
        ws.send_json({"type": "generate", "id": 7, "query": QUESTION, "k": 2})
        msgs = ws_collect(ws, 7)
        kinds = [m["type"] for m in msgs]
        assert kinds[-2:] == ["citations", "done"] and kinds.count("token") > 3
        text = "".join(m["text"] for m in msgs if m["type"] == "token")
        assert len(msgs[-2]["citations"]) == len(cited(text)) >= 1
        assert text == client.post("/generate", json={"query": QUESTION, "k": 2}).json()["answer"]


def test_ws_malformed_messages_keep_the_connection(client):
    with client.websocket_connect("/ws") as ws:
        ws.send_text("not json")
        assert ws.receive_json()["type"] == "error"
        ws.send_json([1, 2])
        assert ws.receive_json()["type"] == "error"
        ws.send_json({"type": "dance", "id": "x"})
        assert ws.receive_json() == {
            "type": "error",
            "id": "x",
            "code": "bad_message",
            "message": "type must be 'search', 'generate' or 'cancel'",
            "status": 400,
        }
        ws.send_json({"type": ["search"], "id": "l"})  # an unhashable type is refused like any other
        assert ws.receive_json()["code"] == "bad_message"
        ws.send_json({"type": "generate", "id": "y", "query": QUESTION, "k": 999})
        err = ws.receive_json()
        assert err["type"] == "error" and err["code"] == "validation_error" and err["id"] == "y"
        ws.send_json({"type": "generate", "id": "z", "query": QUESTION, "backend": "gguf"})
        assert ws_collect(ws, "z")[-1]["type"] in ("error", "done")
        ws.send_json({"type": "search", "id": "ok", "query": QUESTION, "k": 1})
        assert ws_collect(ws, "ok")[0]["type"] == "results"


def test_ws_disconnect_cancels_generation(client, backends):
    slow = SlowGenerator()
    backends["gguf"] = slow
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "generate", "id": "g", "query": QUESTION, "backend": "gguf"})
        assert ws.receive_json()["type"] == "token"
    assert slow.closed.wait(5.0), "the generator was not closed after the client left"
    assert slow.made < 200


def test_ws_cancel_message(client, backends):
    slow = SlowGenerator()
    backends["gguf"] = slow
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "generate", "id": "g", "query": QUESTION, "backend": "gguf"})
        assert ws.receive_json()["type"] == "token"
        ws.send_json({"type": "cancel", "id": "g"})
        while (msg := ws.receive_json())["type"] == "token":
            pass
        assert msg == {"type": "done", "id": "g", "cancelled": True}
        assert slow.closed.wait(5.0)


def test_ws_api_key(client):
    settings = client.app.state.settings
    settings.api_keys = ["secret"]
    try:
        with pytest.raises(WebSocketDisconnect) as exc, client.websocket_connect("/ws") as ws:
            ws.receive_json()
        assert exc.value.code == 1008
        with client.websocket_connect("/ws?api_key=secret") as ws:
            ws.send_json({"type": "search", "id": 1, "query": QUESTION, "k": 1})
            assert ws.receive_json()["type"] == "results"
    finally:
        settings.api_keys = []


# ----------------------------------------------------------------------------------------------------
# OpenAI-compatible API, through the official client


@pytest.fixture
def oai(client):
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def test_openai_client_non_stream(client, oai):
    resp = oai.chat.completions.create(
        model="extractive", messages=[{"role": "user", "content": QUESTION}], extra_body={"mm_k": 2}
    )
    text = resp.choices[0].message.content
    cites = resp.model_extra["mm_citations"]
    assert 1 <= len(cites) <= 2 and cited(text) == list(range(1, len(cites) + 1))
    assert text == client.post("/generate", json={"query": QUESTION, "k": 2}).json()["answer"]


def test_openai_client_stream(oai):
    stream = oai.chat.completions.create(
        model="mm",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": QUESTION}],
        stream=True,
        stop=["[1]"],
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) > 2 and text and "[1]" not in text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert 1 <= len(chunks[-1].model_extra["mm_citations"]) <= 3


def test_openai_models_and_errors(client, oai, backends, tmp_path):

    import openai

    ids = {m.id for m in oai.models.list()}
    # neither is set up here: openai has no endpoint, and the client's gguf_path names no file
    assert ids == {"mm", "extractive", "local"}
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    backends["local"] = LocalGenerator(tmp_path / "none", lambda i: None)
    with pytest.raises(openai.InternalServerError) as exc:
        oai.chat.completions.create(model="local", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 503


def test_local_chat_with_the_default_max_tokens_keeps_the_prompt(client):
    """An OpenAI client's default completion limit (256) is as large as the LM's context: the prompt must
    still be read whole (it was cut to its BOS token), and usage counts what the model read and wrote."""
    from service.generation.backends.local import budget

    resp = client.post(
        "/v1/chat/completions", json={"model": "local", "messages": [{"role": "user", "content": QUESTION}]}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    lm = generators_of(client.app).get("local")._load()
    captions = [c["caption"] for c in body["mm_citations"]]
    prompt = lm.build_prompt(QUESTION, captions)
    kept, max_new = budget(prompt, 256, lm.cfg.max_len)
    # the tiny LM's context is 128: the prompt keeps all but what a quarter-context answer needs
    assert len(kept) == min(len(prompt), lm.cfg.max_len - lm.cfg.max_len // 4) and len(kept) + max_new <= 128
    assert lm.tokenizer.decode(kept).endswith(f"Q: {QUESTION}\nA: ")
    text = body["choices"][0]["message"]["content"]
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(kept) + len(captions)  # text tokens + one prefix vector per item
    assert usage["completion_tokens"] == len(lm.tokenizer.encode(text)) <= max_new
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "kept_len", "max_new"),
    [
        (50, 256, 50, 78),  # the answer gets what the prompt leaves
        (50, 16, 50, 16),  # ... up to max_tokens
        (120, 256, 96, 32),  # a long prompt gives way to a quarter of the context
        (120, 8, 120, 8),  # ... but only as far as the answer needs
        (300, 4096, 96, 32),
    ],
)
def test_budget_shares_the_context_between_prompt_and_answer(prompt_len, max_tokens, kept_len, max_new):
    from service.generation.backends.local import budget

    prompt = [257, *range(1, prompt_len)]  # BOS, then the prompt; its end is the question
    kept, new = budget(prompt, max_tokens, 128)
    assert (len(kept), new) == (kept_len, max_new)
    assert kept[0] == 257 and kept[-1] == prompt[-1] and len(kept) + new <= 128


def test_usage_of_the_extractive_backend_counts_its_words(client):
    resp = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}]})
    body = resp.json()
    words = len(body["choices"][0]["message"]["content"].split())
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": words, "total_tokens": words}


def test_models_lists_only_the_backends_that_are_set_up(tmp_path, embedder):
    from conftest import FakeEmbedder

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    settings = Settings(
        collection=tmp_path / "c",
        lm_path=tmp_path / "no-lm",
        openai_base_url="http://127.0.0.1:9/v1",
        gguf_path=gguf,
    )
    with TestClient(create_app(settings, embedder=FakeEmbedder())) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    import importlib.util

    has_llama = importlib.util.find_spec("llama_cpp") is not None
    assert ids == ["mm", "extractive", "openai", *(["gguf"] if has_llama else [])]


# ----------------------------------------------------------------------------------------------------
# CLI


def test_mm_ask_streams_and_cites(client, embedder, monkeypatch, capsys):
    from service import embedding
    from service.cli import main

    coll_dir = client.app.state.settings.collection
    client.app.state.collection.save()
    monkeypatch.setattr(embedding, "load_embedder", lambda name="default": embedder)
    code = main(
        ["ask", QUESTION, "--collection", str(coll_dir), "-k", "2", "--backend", "extractive", "--json"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    body = json.loads(out.strip().splitlines()[-1])
    assert body["backend"] == "extractive"
    assert len(body["citations"]) == len(cited(body["answer"])) <= 2  # a fresh registry: default rules


# ----------------------------------------------------------------------------------------------------
# grounded answers: the extractive backend's rules, on hand-made hits with calibrated scores


def hit(id: int, score: float, caption: str, modality: str = "image"):
    from index.types import Hit, Item

    return Hit(
        id, score, Item(id=id, modality=modality, uri=f"/lib/{id}.png", sha256=str(id), caption=caption)
    )


FROG_HITS = [
    hit(1, 0.85, "A frog."),
    hit(2, 0.30, "A toad."),
    hit(3, 0.70, "A frog.", "audio"),
    hit(4, 0.12, "An orca."),
    hit(5, 0.40, "Frog sounds at night are loud.", "text"),
]


def test_extractive_names_the_concept_its_items_agree_on_and_cites_only_them():
    from service.generation.prompts import DECLINE

    gen = ExtractiveGenerator()
    used = gen.select("What animal croaks?", FROG_HITS)
    assert [h.id for h in used] == [1, 3]  # the frog's picture and sound; not the toad, orca or the note
    text = gen.compose("What animal croaks?", FROG_HITS)
    assert text.startswith("A frog") and text != DECLINE
    assert cited(text) == [1, 2]
    assert "toad" not in text.lower() and "orca" not in text.lower()


def test_extractive_citations_are_exactly_the_cited_items():
    from service.generation import start_stream

    pieces, cites = start_stream(ExtractiveGenerator(), "What animal croaks?", FROG_HITS)
    text = "".join(pieces)
    assert [c.id for c in cites] == [1, 3]
    assert cited(text) == list(range(1, len(cites) + 1))  # every citation is used, every [n] is one


@pytest.mark.parametrize(
    "hits",
    [
        [],  # nothing retrieved
        [hit(1, 0.05, "A frog."), hit(2, 0.04, "A dog.")],  # nothing clears the item threshold
        [hit(1, 0.55, "A cat."), hit(2, 0.5, "A car."), hit(3, 0.45, "A cup.")],  # scattered, none agree
    ],
)
def test_extractive_declines_and_cites_nothing_when_nothing_is_relevant(hits):
    from service.generation import start_stream
    from service.generation.prompts import DECLINE

    pieces, cites = start_stream(ExtractiveGenerator(), "What is the capital of Mongolia?", hits)
    assert "".join(pieces) == DECLINE and cites == []


def test_extractive_groups_a_concept_across_article_and_case():
    hits = [hit(1, 0.6, "A Frog."), hit(2, 0.6, "the frog", "audio"), hit(3, 0.3, "A dog.")]
    assert [h.id for h in ExtractiveGenerator().select("q", hits)] == [1, 2]


# ----------------------------------------------------------------------------------------------------
# the benchmark's scorer (benchmarks/bench_generate.py), on hand-made answers


def test_bench_scorer_on_hand_made_answers():
    from benchmarks.bench_generate import score_answer, summarise_quality

    right = score_answer("A frog: the collection has a picture [1].", ["frog"], ["frog"])
    assert right["correct"] and right["cited_good"] == 1
    wrong_cite = score_answer("A frog [1].", ["toad"], ["frog"])  # names it, cites an item without it
    assert not wrong_cite["correct"] and wrong_cite["cited_good"] == 0
    unnamed = score_answer("Something green [1].", ["frog"], ["frog"])
    assert not unnamed["correct"]
    kind = score_answer("A snare drum hit [1].", ["snare drum"], ["drum"])  # a snare drum carries "drum"
    assert kind["correct"]
    assert not score_answer("A frogman [1].", ["frogman"], ["frog"])["correct"]  # a phrase, not a prefix
    assert not score_answer("A train [1].", ["train sign"], ["train"])["correct"]  # a sign is no train
    declined = score_answer("I could not find anything about that in the collection.", [], [])
    assert declined["correct"] and declined["declined"]
    false = score_answer("Ulaanbaatar [1].", ["flag of K"], [])
    assert not false["correct"]
    hedged = score_answer("I could not find it, but see [1].", ["frog"], [])  # declines yet cites: wrong
    assert not hedged["correct"]
    rows = [
        {**right, "answerable": True, "in_collection": True},
        {**wrong_cite, "answerable": True, "in_collection": True},
        {**declined, "answerable": False, "in_collection": False},
        {**false, "answerable": False, "in_collection": False},
    ]
    q = summarise_quality(rows)
    assert q["accuracy"] == 0.5 and q["false_answer_rate"] == 0.5 and q["citation_precision"] == 0.5


def test_bench_cited_numbers_ignore_what_is_not_a_citation():
    from benchmarks.bench_generate import cited_numbers

    assert cited_numbers("a [2] b [1] c [2] d [7]", 3) == [2, 1]


def test_retrieval_text_keeps_what_a_question_is_about():
    from service.generation.prompts import retrieval_text

    assert retrieval_text("Which animal is called the king of the jungle?") == "animal king jungle"
    assert retrieval_text("Is there a sound of a goat?") == "sound goat"
    assert retrieval_text("Who is it?") == "Who is it?"  # nothing else left: the question as it is
