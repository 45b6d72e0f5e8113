"""Spoken queries through the one search path: ``mm eval --search``'s spoken part (service.search_eval),
``/search/upload``'s ``mode`` and the demo's spoken example. The recogniser is a fake that tells each
clip by its length (a decoded clip is ``(wave, rate)``), attached as ``load_embedder`` attaches one."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
from conftest import SAMPLE_RATE, image_bytes, tone
from fastapi.testclient import TestClient

from index.collection import Collection
from index.ingest import add_text
from service.search_eval import evaluate_spoken, spoken_queries

WORDS = ["apple", "boat", "cactus", "drum", "eagle", "falcon"]


def _seconds(i: int) -> float:
    return 0.4 + 0.1 * i  # each word's clip has its own length: the fake recogniser's key


def hears(words: list[str]):
    by_length = {int(_seconds(i) * SAMPLE_RATE): w for i, w in enumerate(words)}

    def transcribe(payload):
        word = by_length.get(len(payload[0]))
        return None if word is None else {"text": f"a {word}", "language": "en"}

    return transcribe


def _rows(tmp_path):
    rows = []
    for i, w in enumerate(WORDS):
        img, clip = tmp_path / f"{w}.png", tmp_path / f"said-{i}.wav"
        img.write_bytes(image_bytes((40 * i, 200 - 30 * i, 90), ["circle", "square", "triangle"][i % 3]))
        sf.write(clip, tone(300.0, _seconds(i)), SAMPLE_RATE)  # same pitch: the clips alone say nothing
        rows.append({"id": w, "image": str(img), "text": f"A {w}.", "lang": "en", "label": w})
        rows.append(
            {"id": f"speech/{w}", "audio": str(clip), "text": f"A {w}.", "lang": "en", "label": w,
             "source": "speech"}
        )  # fmt: skip
    return rows


def test_spoken_queries_are_the_clips_of_speech(tmp_path):
    rows = _rows(tmp_path)
    human = {"id": "kt/fr/chat", "audio": "chat.ogg", "text": "chat", "lang": "fr", "label": "cat",
             "meta": {"speech_lang": "fr"}}  # fmt: skip
    drum = {"id": "sp/drum", "audio": "drum.wav", "text": "A drum.", "label": "drum", "source": "sonicpi"}
    got = spoken_queries([*rows, human, drum])
    assert [label for _, label in got] == [*WORDS, "cat"]  # the drum hit is a sound, not speech


def test_eval_scores_spoken_queries_through_the_fused_upload_path(tmp_path, embedder):
    rows = _rows(tmp_path)
    out = evaluate_spoken(rows, embedder, hears(WORDS))
    assert out["n"] == len(WORDS) and out["transcribed"] == 1.0
    assert set(out["clip"]) == set(out["fused"]) == {"vector", "hybrid"}  # the modes a file query takes
    for setting in ("clip", "fused"):
        for mode in ("vector", "hybrid"):
            assert set(out[setting][mode]) == {"spoken->image", "spoken->text"}
            assert all(m["n"] == len(WORDS) for m in out[setting][mode].values())
    # the transcript's words find the file named after the word and the caption that says it
    assert out["fused"]["hybrid"]["spoken->image"]["R@1"] == 1.0
    assert out["fused"]["hybrid"]["spoken->text"]["R@1"] == 1.0
    # six clips of one pitch differ only in length: alone they cannot tell six words apart
    assert out["clip"]["hybrid"]["spoken->image"]["R@1"] < 1.0
    assert out["clip"]["hybrid"] == out["clip"]["vector"]  # no transcript, no words: hybrid is vector
    # nothing heard: the fused path is the clip's own (embed_file falls back to the clip alone)
    deaf = evaluate_spoken(rows, embedder, lambda payload: None, modes=("hybrid",))
    assert deaf["transcribed"] == 0.0 and deaf["fused"] == deaf["clip"] == {"hybrid": out["clip"]["hybrid"]}


def test_eval_uses_the_embedders_own_recogniser_and_bounds_the_queries(tmp_path, embedder, monkeypatch):
    monkeypatch.setattr(embedder, "transcribe", hears(WORDS))
    out = evaluate_spoken(_rows(tmp_path), embedder, limit=3, modes=("hybrid",))
    assert out["n"] == 3 and out["transcribed"] == 1.0
    assert out["fused"]["hybrid"]["spoken->image"] == {"R@1": 1.0, "R@10": 1.0, "n": 3}


def test_cli_eval_search_reports_spoken_queries(tmp_path, monkeypatch, capsys):
    from service.cli import main

    monkeypatch.setenv("MM_TRANSCRIBE", "0")  # no recogniser: the test downloads and loads nothing
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(dict(r, split="test")) + "\n" for r in _rows(tmp_path)))
    argv = ["eval", "--manifest", str(manifest), "--model", "tiny", "--search", "--spoken", "4", "--json"]
    assert main(argv) == 0
    spoken = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["search_spoken"]
    assert spoken["n"] == 4 and spoken["transcribed"] == 0.0
    assert spoken["fused"]["vector"]["spoken->image"]["n"] == 4


@pytest.fixture
def client(tmp_path, embedder, monkeypatch):
    from service.app import create_app
    from service.settings import Settings

    monkeypatch.setattr(embedder, "transcribe", hears(["red car"]))
    with Collection.create(tmp_path / "c", dim=embedder.dim, embedder_id=embedder.model_id) as coll:
        for text in ("a barking dog", "an owl at night", "the ocean", "a green field"):
            add_text(coll, embedder, text)  # enough items for the words "red car" to be rare (BM25)
        car = add_text(coll, embedder, "a red car")
    app = create_app(Settings(collection=tmp_path / "c"), embedder=embedder)
    with TestClient(app) as c:
        yield c, car.id


def _upload(client, **form):
    wav = io.BytesIO()
    sf.write(wav, tone(300.0, _seconds(0)), SAMPLE_RATE, format="WAV")
    return client.post("/search/upload", files={"file": ("q.wav", wav.getvalue(), "audio/wav")}, data=form)


def test_upload_takes_the_search_modes(client):
    c, car = client
    hybrid = _upload(c).json()  # hybrid by default, as POST /search
    vector = _upload(c, mode="vector").json()
    assert hybrid["heard"] == vector["heard"] == {"text": "a red car", "language": "en"}
    words = {r["id"]: r["lexical_score"] for r in hybrid["results"]}
    assert hybrid["results"][0]["id"] == car and words[car] > 0  # the transcript's words matched
    assert all(r["lexical_score"] is None for r in vector["results"])  # vector: no word search ran
    refused = _upload(c, mode="keyword")  # a file has no text of its own (SearchQuery's one rule)
    assert refused.status_code == 422 and "give a text query" in refused.json()["error"]["message"]
    assert _upload(c, mode="fuzzy").status_code == 422
    form = c.get("/openapi.json").json()["components"]["schemas"]["Body_search_upload_search_upload_post"]
    assert form["properties"]["mode"]["enum"] == ["hybrid", "vector"]  # the schema says what is taken


def test_demo_spoken_example_goes_through_the_upload_path(tmp_path, embedder, monkeypatch):
    from service.demo import Example, run_examples

    clip = tmp_path / "a_cat.wav"
    sf.write(clip, tone(300.0, _seconds(0)), SAMPLE_RATE)
    with Collection.create(tmp_path / "c", dim=embedder.dim, embedder_id=embedder.model_id) as coll:
        add_text(coll, embedder, "a dog")
        cat = add_text(coll, embedder, "a cat")
        spoken = Example("spoken 'a cat' -> text", "audio", str(clip), ["text"])
        (plain,) = run_examples(coll, embedder, [spoken], k=2)
        assert plain["heard"] is None  # no recogniser: the clip alone
        monkeypatch.setattr(embedder, "transcribe", hears(["cat"]))
        (shown,) = run_examples(coll, embedder, [spoken], k=2)
    assert shown["heard"] == {"text": "a cat", "language": "en"}
    assert shown["results"][0]["id"] == cat.id
    assert np.isfinite([r["score"] for r in shown["results"]]).all()
