"""``mm`` CLI round trips through ``main([...])`` on the fixture folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGES, SOUNDS, TEXTS

from service import embedding
from service.cli import main

N_GOOD = len(IMAGES) + len(SOUNDS) + len(TEXTS)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def patched_embedder(embedder):
    """Every CLI load of the model returns the session's embedder (loaded once)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(embedding, "load_embedder", lambda name="default": embedder)
    yield embedder
    mp.undo()


@pytest.fixture(scope="module")
def coll(tmp_path_factory, media_root, patched_embedder) -> Path:
    path = tmp_path_factory.mktemp("cli") / "coll"
    code = main(["index", str(media_root), "--collection", str(path), "--tags", "fx,cli", "--json", "-q"])
    assert code == 0
    return path


def test_index_reports_counts_and_errors(capsys, media_root, tmp_path, patched_embedder):
    out = run_json(capsys, "index", str(media_root), "--collection", str(tmp_path / "c"), "--workers", "1")
    assert out["added"] == N_GOOD and out["count"] == N_GOOD
    assert {Path(e["path"]).name for e in out["errors"]} >= {"broken.png", "empty.wav"}
    again = run_json(capsys, "index", str(media_root), "--collection", str(tmp_path / "c"))
    assert again["added"] == 0 and again["count"] == N_GOOD  # unchanged files are skipped


def test_info(capsys, coll):
    info = run_json(capsys, "info", "--collection", str(coll))
    assert info["count"] == N_GOOD and info["by_modality"]["image"] == len(IMAGES)
    assert info["dim"] > 0 and info["embedder_id"]
    code, out, _ = run(capsys, "info", "--collection", str(coll))
    assert code == 0 and f"items       {N_GOOD}" in out
    keys = [line.split()[0] for line in out.splitlines()]
    assert len(keys) == len(set(keys)), out  # each figure once ("items" and "path" were printed twice)
    assert "MB)" in next(line for line in out.splitlines() if line.startswith("bytes"))


def test_search_text_image_audio(capsys, coll, media_root):
    res = run_json(capsys, "search", TEXTS["ocean.txt"], "--collection", str(coll), "-k", "3")
    assert res["query"] == {"type": "text", "value": TEXTS["ocean.txt"]}
    assert Path(res["results"][0]["uri"]).name == "ocean.txt" and len(res["results"]) == 3
    img = media_root / "images" / "yellow_stripes.jpg"
    res = run_json(capsys, "search", "--image", str(img), "--collection", str(coll), "--modality", "image")
    assert Path(res["results"][0]["uri"]).name == "yellow_stripes.jpg"
    assert {r["modality"] for r in res["results"]} == {"image"}
    snd = media_root / "sounds" / "tone_high.flac"
    res = run_json(capsys, "search", "--audio", str(snd), "--collection", str(coll), "-k", "1")
    assert Path(res["results"][0]["uri"]).name == "tone_high.flac"

    code, out, _ = run(capsys, "search", "cats", "--collection", str(coll), "-k", "2")
    lines = out.strip().splitlines()
    assert (
        code == 0
        and lines[0].split() == ["#", "score", "modality", "id", "caption", "uri"]
        and len(lines) == 3
    )


def test_search_filters_and_more_like_this(capsys, coll, media_root):
    sounds = str(media_root / "sounds")
    res = run_json(capsys, "search", "tone", "--collection", str(coll), "--filter", f"path={sounds}")
    assert len(res["results"]) == len(SOUNDS) and {r["modality"] for r in res["results"]} == {"audio"}
    res = run_json(capsys, "search", "x", "--collection", str(coll), "--filter", "tag=nope")
    assert res["results"] == []
    res = run_json(capsys, "search", "x", "--collection", str(coll), "--filter", "tag=cli", "-k", "50")
    assert len(res["results"]) == N_GOOD
    res = run_json(capsys, "search", "x", "--collection", str(coll), "--filter", "since=2999-01-01")
    assert res["results"] == []
    first = run_json(capsys, "search", "x", "--collection", str(coll), "-k", "1")["results"][0]
    res = run_json(capsys, "search", "--item", str(first["id"]), "--collection", str(coll), "-k", "50")
    assert first["id"] not in [r["id"] for r in res["results"]] and len(res["results"]) == N_GOOD - 1
    page = run_json(capsys, "search", "x", "--collection", str(coll), "-k", "2", "--offset", "1")["results"]
    full = run_json(capsys, "search", "x", "--collection", str(coll), "-k", "3")["results"]
    assert [r["id"] for r in page] == [r["id"] for r in full[1:3]]


@pytest.mark.parametrize("fmt", ["npz", "npy", "parquet"])
def test_export(capsys, coll, tmp_path, fmt):
    out = tmp_path / f"export.{fmt}"
    res = run_json(capsys, "export", "--collection", str(coll), "--out", str(out))
    assert res["count"] == N_GOOD and out.exists()
    if fmt == "npz":
        data = np.load(out)
        ids, vectors, modality = data["ids"], data["vectors"], data["modality"]
        tags = [json.loads(t) for t in data["tags"]]
    elif fmt == "npy":
        rec = np.load(out)
        ids, vectors, modality = rec["id"], rec["vector"], rec["modality"]
        tags = [json.loads(t) for t in rec["tags"]]
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out).to_pydict()
        ids, vectors, modality = np.array(table["id"]), np.array(table["vector"]), table["modality"]
        tags = table["tags"]
    assert vectors.shape == (N_GOOD, res["dim"]) and len(set(ids.tolist())) == N_GOOD
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert sorted(modality) == sorted(
        ["image"] * len(IMAGES) + ["audio"] * len(SOUNDS) + ["text"] * len(TEXTS)
    )
    assert all("cli" in t for t in tags)


def test_remove_then_search(capsys, tmp_path, media_root, patched_embedder):
    c = str(tmp_path / "c")
    assert run(capsys, "index", str(media_root / "texts"), "--collection", c, "-q")[0] == 0
    hits = run_json(capsys, "search", TEXTS["cats.txt"], "--collection", c, "-k", "1")["results"]
    res = run_json(capsys, "remove", str(hits[0]["id"]), "--collection", c)
    assert res == {"removed": [hits[0]["id"]], "missing": []}
    left = run_json(capsys, "search", TEXTS["cats.txt"], "--collection", c, "-k", "5")["results"]
    assert hits[0]["id"] not in [r["id"] for r in left] and len(left) == len(TEXTS) - 1
    code, _, err = run(capsys, "remove", "424242", "--collection", c)
    assert code == 1 and err.strip() == "mm: error: no item with id 424242"


def test_errors_are_one_line(capsys, tmp_path, coll, monkeypatch):
    cases = [
        (["search", "x"], 2),  # --collection missing and no MM_COLLECTION
        (["search", "--collection", str(coll)], 2),  # no query
        (["search", "x", "--image", "y.png", "--collection", str(coll)], 2),  # two queries
        (["search", "x", "--filter", "colour=red", "--collection", str(coll)], 2),
        (["search", "x", "--modality", "video", "--collection", str(coll)], 2),
        (["search", "x", "-k", "0", "--collection", str(coll)], 2),
        (["frobnicate"], 2),
        (["info", "--collection", str(tmp_path / "nothing")], 1),
        (["index", str(tmp_path / "missing"), "--collection", str(coll)], 1),
        (["search", "--image", str(tmp_path / "missing.png"), "--collection", str(coll)], 1),
        (["export", "--collection", str(coll), "--out", str(tmp_path / "x.csv")], 2),
    ]
    monkeypatch.delenv("MM_COLLECTION", raising=False)
    for argv, expected in cases:
        code, out, err = run(capsys, *argv)
        assert code == expected, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mm: error: "), (argv, err)
        assert "Traceback" not in err


def test_collection_from_env(capsys, coll, monkeypatch):
    monkeypatch.setenv("MM_COLLECTION", str(coll))
    assert run_json(capsys, "info")["count"] == N_GOOD


def test_model_mismatch_is_refused(capsys, coll, monkeypatch):
    class Other:
        dim, modalities, model_id = 8, ("text",), "other:1"

    monkeypatch.setattr(embedding, "load_embedder", lambda name="default": Other())
    for command in (["search", "x"], ["ask", "what is x?"]):
        code, _, err = run(capsys, *command, "--collection", str(coll))
        assert code == 1 and "was built with model" in err and "mm index --reembed" in err, (command, err)


def test_real_tiny_model_round_trip(capsys, tmp_path, media_root):
    """No patching: `--model tiny` is loaded by each command, so its weights must be reproducible."""
    from mm.model import create_model

    # Each command loads the model afresh: if ids differed per call, the collection could not be reopened.
    assert create_model("tiny").model_id == create_model("tiny").model_id
    c = str(tmp_path / "c")
    out = run_json(capsys, "index", str(media_root / "images"), "--collection", c, "--model", "tiny")
    assert out["added"] == len(IMAGES)
    img = media_root / "images" / "red_circle.png"
    res = run_json(capsys, "search", "--image", str(img), "--collection", c, "--model", "tiny", "-k", "1")
    assert Path(res["results"][0]["uri"]).name == "red_circle.png"


@pytest.mark.parametrize(
    "command", [["search", "a frog"], ["search", "a frog", "--local"], ["ask", "what is a frog?"]]
)
def test_a_missing_collection_is_said_before_the_model_loads(capsys, tmp_path, monkeypatch, command):
    import service.cli.ask as ask_cli
    import service.cli.search as search_cli

    def no_model(*_a, **_k):
        raise AssertionError("the model was loaded for a collection that does not exist")

    for module in (search_cli, ask_cli):
        monkeypatch.setattr(module, "load_embedder", no_model)
    code, _, err = run(capsys, *command, "--collection", str(tmp_path / "nothing"))
    assert code == 1 and err.strip().splitlines() == [err.strip().splitlines()[-1]], err  # one line
    assert err.startswith("mm: error: no collection at"), err  # not "loading the model" first
