"""A running server searches what another process (`mm index`, `mm remove`) committed, without a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import FakeEmbedder
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
_OTHER_PROCESS = r"""
import json, sys
from conftest import FakeEmbedder
from index.collection import Collection
from index.ingest import add_text

path, op, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with Collection.open(path) as coll:
    if op == "add":
        print(json.dumps([add_text(coll, FakeEmbedder(), text).id for text in arg]))
    else:
        print(json.dumps(coll.delete(arg)))
"""


def _other_process(path: Path, op: str, arg: list) -> list[int] | int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, str(path), op, json.dumps(arg)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout)


def test_server_finds_items_another_process_added_and_drops_those_it_deleted(tmp_path):
    settings = Settings(collection=tmp_path / "coll")
    with TestClient(create_app(settings, embedder=FakeEmbedder())) as client:
        first = client.post("/items/text", json={"text": "a quiet grey harbour"}).json()
        texts = ["purple elephant dancing", "copper kettle whistling"]
        added = _other_process(settings.collection, "add", texts)
        assert client.get("/items").json()["total"] == 3
        for text, id_ in zip(texts, added, strict=True):
            top = client.post("/search", json={"query": text, "k": 1}).json()["results"]
            assert [r["id"] for r in top] == [id_], (text, top)
        assert _other_process(settings.collection, "delete", [added[0]]) == 1
        hits = client.post("/search", json={"query": texts[0], "k": 5}).json()["results"]
        assert added[0] not in {r["id"] for r in hits} and {r["id"] for r in hits} == {first["id"], added[1]}
        assert client.get(f"/items/{added[0]}").status_code == 404
