"""`mm demo` on a tiny corpus: library with sidecar captions, indexing, example queries, reuse."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf
from PIL import Image

from service.cli import main
from service.demo import build_library, demo


def make_corpus(root):
    media = root / "corpus" / "media"
    media.mkdir(parents=True)
    rows = []
    for i, (name, rgb) in enumerate(
        {"frog": (30, 200, 40), "cat": (200, 120, 20), "drum": (20, 20, 200)}.items()
    ):
        Image.new("RGB", (40, 40), rgb).save(media / f"{name}.png")
        sf.write(media / f"{name}.ogg", np.sin(np.arange(4000) * (0.05 + 0.03 * i)).astype(np.float32), 16000)
        rows.append(
            {
                "id": f"tp/{name}",
                "image": f"media/{name}.png",
                "audio": f"media/{name}.ogg",
                "text": f"A {name}.",
                "label": name,
                "source": "tuxpaint",
                "split": "test",
                "lang": "en",
            }
        )
        rows.append(
            {
                "id": f"tp/{name}/fr",
                "image": f"media/{name}.png",
                "text": f"Un {name}.",
                "label": name,
                "source": "tuxpaint",
                "split": "test",
                "lang": "fr",
            }
        )
    (root / "corpus" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_library_has_media_and_english_sidecars(tmp_path):
    make_corpus(tmp_path)
    placed = build_library(tmp_path / "corpus", tmp_path / "library")
    assert placed == 6
    assert (tmp_path / "library" / "tuxpaint" / "frog.txt").read_text().strip() == "A frog."
    assert len(list((tmp_path / "library" / "captions").glob("*.txt"))) == 3
    assert build_library(tmp_path / "corpus", tmp_path / "library") == 0  # idempotent


def test_demo_indexes_queries_and_reuses(tmp_path, capsys):
    make_corpus(tmp_path)
    shown = demo(tmp_path, model="tiny", serve=False, progress=False)
    titles = [s["title"] for s in shown]
    assert "text -> image" in titles and "text -> audio" in titles
    for s in shown:
        mods = {r["modality"] for r in s["results"]}
        assert s["results"] and len(mods) == 1  # filtered to the target modality
    out = capsys.readouterr().out
    assert "9 items" in out and "added 9" in out
    assert main(["demo", "--work", str(tmp_path), "--model", "tiny", "--no-serve"]) == 0
    assert "added 0, skipped 9" in capsys.readouterr().out
