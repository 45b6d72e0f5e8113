"""``mm search`` answered by a running ``mm serve`` (its ``serve.json``) gives what the local path gives.

One real ``mm serve --model tiny --port 0`` subprocess (with an API key) serves a tiny-model collection;
each query runs through ``main([...])`` twice, over HTTP and with ``--local``, and the answers must be
equal but for ``took_ms``. The served run may not load the model (``load_embedder`` is made to fail).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.cli import main, remote
from service.cli import search as search_cli

KEY = "k-remote-test-0123456789"
START_TIMEOUT_S = 180  # the tiny model and the app start in seconds; the test machines are shared


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def coll(tmp_path_factory, media_root) -> Path:
    path = tmp_path_factory.mktemp("remote") / "coll"
    code = main(["index", str(media_root), "-c", str(path), "--model", "tiny", "--tags", "fx", "-q"])
    assert code == 0
    return path


@pytest.fixture(scope="module")
def server(coll):
    env = {**os.environ, "MM_API_KEYS": KEY}
    env.pop("MM_API_KEY", None)
    cmd = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())"]
    cmd += ["serve", "-c", str(coll), "--model", "tiny", "--port", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    info = None
    while time.monotonic() < deadline and proc.poll() is None:
        info = remote.read_serve_file(coll)
        if info is not None:
            break
        time.sleep(0.2)
    if info is None:
        proc.kill()
        pytest.fail(f"mm serve did not announce itself: {proc.communicate()[0][-2000:]}")
    yield proc, info
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv("MM_API_KEY", KEY)


def no_model(*_a, **_k):
    raise AssertionError("the model was loaded although a server is running")


QUERIES = [
    ["a red circle", "-k", "5"],
    ["red circle", "--mode", "keyword"],
    ["a green triangle", "--mode", "vector", "-k", "3"],
    ["ocean waves", "--modality", "text,image", "--filter", "tag=fx"],
    ["--image", "images/yellow_stripes.jpg", "-k", "4", "--offset", "1"],
    ["--audio", "sounds/tone_high.flac", "--modality", "audio"],
    ["--image", "images/red_circle.png", "--mode", "vector", "-k", "3"],  # the upload form takes a mode
    ["--item", "{an_id}", "-k", "3"],
]


@pytest.mark.parametrize(
    "argv",
    QUERIES,
    ids=["text", "keyword", "vector", "text-filtered", "image-paged", "audio", "image-vector", "item"],
)
def test_served_and_local_answers_are_equal(capsys, monkeypatch, coll, server, keyed, media_root, argv):
    _, info = server
    argv = [str(media_root / a) if "/" in a else a for a in argv]
    if "{an_id}" in argv:
        code, out, _ = run(capsys, "search", "cats", "-c", str(coll), "--model", "tiny", "--json", "--local")
        argv[argv.index("{an_id}")] = str(json.loads(out)["results"][0]["id"])
    common = ["search", *argv, "-c", str(coll), "--model", "tiny", "--json"]

    with monkeypatch.context() as m:
        m.setattr(search_cli, "load_embedder", no_model)
        code, out, err = run(capsys, *common)
    assert code == 0, err
    assert f"using the server at {info.url}" in err and KEY not in err
    served = json.loads(out)

    code, out, err = run(capsys, *common, "--local")
    assert code == 0, err
    assert "using the server" not in err
    local = json.loads(out)

    assert served["results"], served
    served.pop("took_ms"), local.pop("took_ms")
    assert served == local


def test_text_output_from_the_server(capsys, monkeypatch, coll, server, keyed):
    monkeypatch.setattr(search_cli, "load_embedder", no_model)
    code, out, err = run(capsys, "search", "cats", "-c", str(coll), "--model", "tiny", "-k", "2")
    assert code == 0, err
    assert out.splitlines()[0].split() == ["#", "score", "modality", "id", "caption", "uri"]
    assert len(out.strip().splitlines()) == 3


def test_server_errors_are_one_line(capsys, monkeypatch, coll, server, keyed):
    monkeypatch.setattr(search_cli, "load_embedder", no_model)
    code, out, err = run(capsys, "search", "--item", "999999", "-c", str(coll), "--model", "tiny")
    assert code == 1 and not out
    assert "999999 not found" in err and len(err.strip().splitlines()) == 2  # the "using" line, the error


def test_missing_api_key_is_named_never_echoed(capsys, monkeypatch, coll, server):
    monkeypatch.delenv("MM_API_KEY", raising=False)
    monkeypatch.setattr(search_cli, "load_embedder", no_model)
    code, out, err = run(capsys, "search", "cats", "-c", str(coll), "--model", "tiny")
    assert code == 1 and not out
    assert "MM_API_KEY" in err and KEY not in err
    monkeypatch.setenv("MM_API_KEY", "wrong-key")
    code, out, err = run(capsys, "search", "cats", "-c", str(coll), "--model", "tiny")
    assert code == 1 and "MM_API_KEY" in err and "wrong-key" not in err


def test_another_model_searches_locally(capsys, monkeypatch, coll, server, keyed):
    calls = []
    monkeypatch.setattr(search_cli, "load_embedder", lambda name: calls.append(name) or no_model())
    code, _, err = run(capsys, "search", "cats", "-c", str(coll), "--model", "small")
    assert calls == ["small"] and code == 1
    assert "serves 'tiny', not 'small'" in err


def test_stale_or_foreign_serve_file_is_not_trusted(capsys, coll, server, keyed):
    _, info = server
    path = coll / remote.SERVE_FILE
    saved = path.read_bytes()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        # a server killed without clean-up: its pid is gone
        remote.write_serve_file(coll, info.__class__(**{**info.__dict__, "pid": dead.pid}))
        code, out, err = run(
            capsys, "search", "cats", "-c", str(coll), "--model", "tiny", "--json", "-k", "2"
        )
        assert code == 0 and len(json.loads(out)["results"]) == 2
        assert "loading the model" in err and f"stale {remote.SERVE_FILE}" in err
        # a live pid and a port that answers, but not with the token the file holds
        remote.write_serve_file(coll, info.__class__(**{**info.__dict__, "instance": "0" * 32}))
        code, out, err = run(
            capsys, "search", "cats", "-c", str(coll), "--model", "tiny", "--json", "-k", "2"
        )
        assert code == 0 and "loading the model" in err and "not the server" in err
        # garbage in the file
        path.write_text("{not json")
        code, _, err = run(capsys, "search", "cats", "-c", str(coll), "--model", "tiny", "--json", "-k", "2")
        assert code == 0 and "loading the model (no server running" in err
    finally:
        path.write_bytes(saved)


def test_serve_file_is_api_key_free_and_removed_on_exit(coll, server):
    proc, info = server
    text = (coll / remote.SERVE_FILE).read_text()
    assert KEY not in text
    assert json.loads(text)["pid"] == proc.pid and info.port > 0
    proc.terminate()  # SIGTERM: uvicorn shuts down cleanly
    proc.wait(timeout=60)
    assert not (coll / remote.SERVE_FILE).exists()


def test_no_server_loads_the_model_and_says_so(capsys, coll, server):
    proc, _ = server
    assert proc.poll() is not None  # after the test above
    code, out, err = run(capsys, "search", "cats", "-c", str(coll), "--model", "tiny", "--json", "-k", "1")
    assert code == 0 and json.loads(out)["results"]
    assert "loading the model (no server running; `mm serve` keeps it warm)" in err
