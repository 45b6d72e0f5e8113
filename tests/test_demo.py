"""`mm demo` on a tiny corpus: library with sidecar captions, indexing, example queries, reuse."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
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


def test_demo_reembeds_its_collection_after_a_model_update(tmp_path, capsys):
    import torch

    from index.collection import Collection
    from mm.model import create_model, save_model

    make_corpus(tmp_path)
    demo(tmp_path, model="tiny", serve=False, progress=False)
    old = Collection.open(tmp_path / "collection", readonly=True)
    old_id, (ids, old_vectors) = old.embedder_id, old.all_vectors()
    old.close()
    updated = create_model("tiny").model
    torch.nn.init.normal_(updated.out_proj.weight, std=0.2)  # other weights: another model id
    ckpt = save_model(updated, tmp_path / "updated")
    new_id = create_model(ckpt).model_id
    assert new_id != old_id
    shown = demo(tmp_path, model=str(ckpt), serve=False, progress=False)  # no "holds vectors of" error
    assert all(s["results"] for s in shown)
    coll = Collection.open(tmp_path / "collection", readonly=True)
    new_ids, new_vectors = coll.all_vectors()
    assert coll.embedder_id == new_id and coll.count() == 9  # the same items, with the new model's vectors
    coll.close()
    order, new_order = np.argsort(ids), np.argsort(new_ids)
    assert np.array_equal(ids[order], new_ids[new_order])
    assert not np.allclose(old_vectors[order], new_vectors[new_order], atol=1e-3)
    assert "added 0, skipped 9" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs the espeak-ng Debian package")
def test_the_demos_spoken_example_is_heard_as_the_thing_it_names(tmp_path):
    """The packaged Whisper hears the demo's spoken query (espeak-ng) as the thing it names: it heard the
    earlier "a cat" as "A cot.", and the example then showed a lamb, a peacock and a gravestone."""
    from service.demo import examples
    from service.transcription import LazyTranscriber

    (spoken,) = [e for e in examples(tmp_path / "library", tmp_path) if e.kind == "audio"]
    said = re.fullmatch(r"spoken '(.+)' -> image", spoken.title)
    assert said is not None, spoken.title
    heard = LazyTranscriber()(spoken.query)
    assert heard is not None and heard["language"] == "en"
    assert said.group(1).split()[-1] in re.findall(r"[a-z]+", heard["text"].lower()), heard
