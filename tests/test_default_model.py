"""The shipped default model on real stamps: queries whose words never occur in training captions.

The query words below ("puppy", "canine", "pony", "stallion", "toad", "amphibian", "arachnid") appear in
no training caption of the sample corpus (checked against `mm samples build` output; bench_quality.py
measures the same thing on every test caption with an unseen word). They work because the frozen
text tower's semantics reach the shared space through the backbone and the pooled residual.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mm.model import CHECKPOINT_DIR, create_model

STAMPS = Path("/usr/share/tuxpaint/stamps")
TARGETS = {
    "dog": "animals/mammals/dogs/dog.png",
    "horse": "animals/mammals/equines/horse.png",
    "frog": "animals/amphibians/frog.png",
    "spider": "seasonal/halloween/spider.png",
    "sedan": "vehicles/auto/sedan.png",
    "apple": "food/fruit/cartoon/apple.png",
}
QUERIES = {
    "a puppy": "dog",
    "a canine": "dog",
    "a pony": "horse",
    "a stallion": "horse",
    "a toad": "frog",
    "an amphibian": "frog",
    "an arachnid": "spider",
}

# The checkpoint ships in the repository: its absence is a break, not a reason to skip. The stamps come
# from a Debian package (`make setup` installs it), so only they may be missing.
needs_stamps = pytest.mark.skipif(
    not (STAMPS / TARGETS["dog"]).exists(), reason="needs the tuxpaint-stamps-default Debian package"
)


def test_default_checkpoint_is_shipped():
    assert (CHECKPOINT_DIR / "default" / "model.safetensors").is_file()


@needs_stamps
def test_unseen_words_find_the_right_stamp():
    emb = create_model("default")
    distractors = sorted(p for p in STAMPS.glob("*/*.png"))[:10]
    gallery = [STAMPS / p for p in TARGETS.values()] + distractors
    names = list(TARGETS) + [p.stem for p in distractors]
    g = emb.encode_image([str(p) for p in gallery])
    q = emb.encode_text(list(QUERIES))
    ranks = np.argsort(-(q @ g.T), axis=1)
    top3 = [names.index(target) in ranks[i, :3] for i, target in enumerate(QUERIES.values())]
    assert sum(top3) >= 5, dict(zip(QUERIES, top3, strict=True))


@pytest.mark.slow
@needs_stamps
def test_a_barking_dog_finds_the_dog_picture_and_sound_in_default_search_of_uncaptioned_files(tmp_path):
    """The README's first query as a user's folder meets it: every animal stamp's picture and sound from the
    tuxpaint package (a few hundred files), no caption beside any, searched in the default (hybrid) mode.

    Vector search alone does not do it yet (issue 16's target, missed; docs/results.md "Default model v2"):
    hub items (a lamb's bleat, a singing dinosaur) outrank the dog for many animal queries, so this test
    pins what users get today: the file name's word match, calibrated, beside the vector ranking."""
    import shutil

    from index.collection import Collection
    from index.ingest import ingest
    from service.schemas import SearchQuery
    from service.search import answer

    emb = create_model("default")
    lib = tmp_path / "library"
    lib.mkdir()
    for png in sorted((STAMPS / "animals").rglob("*.png")):
        for f in (png, png.with_suffix(".ogg")):  # the stamp's own sound, not its spoken description
            if f.exists():
                shutil.copy(f, lib / f"{png.parent.name}-{f.name}")
    coll = Collection.create(tmp_path / "coll", dim=emb.dim, embedder_id=emb.model_id)
    try:
        report = ingest(coll, emb, [lib], progress=False)
        assert report.failed == 0 and coll.count() >= 100
        dog = {("image", "dogs-dog.png"), ("audio", "dogs-dog.ogg")}

        def top(mode: str, k: int) -> set[tuple[str, str]]:
            found = answer(SearchQuery(query="a barking dog", k=k, mode=mode), emb, coll)
            return {(h.item.modality, Path(h.item.uri).name) for h in found.hits}

        assert dog <= top("hybrid", 5)
    finally:
        coll.close()


@pytest.mark.slow
@needs_stamps
def test_the_readmes_ask_example_answers_and_cites_what_it_asks_about(tmp_path, capsys):
    """`mm ask` as the README shows it, on a folder of animal stamps (picture + sound, each with its English
    caption beside it, as the demo's library has) with the shipped default model and its tuned answer
    rules: the answer names the animal and cites its items only."""
    import json
    import re
    import shutil

    from service.cli import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (question,) = re.findall(r'mm ask "([^"]+)" --collection', readme)
    animal = "frog"
    assert animal in question
    lib = tmp_path / "library"
    lib.mkdir()
    stamps = sorted((STAMPS / "animals").rglob("*.png"))
    chosen = [p for p in stamps[::4] if animal not in p.stem] + [p for p in stamps if animal in p.stem]
    for png in chosen:  # a captioned folder, as the demo's library is: each file with its English sidecar
        caption = png.with_suffix(".txt").read_text(errors="replace").splitlines()[0]
        for f in (png, png.with_suffix(".ogg")):
            if f.exists() and not (lib / f.name).exists():
                shutil.copy(f, lib / f.name)
                (lib / f.name).with_suffix(".txt").write_text(caption + "\n")
    coll = str(tmp_path / "coll")
    assert main(["index", str(lib), "--collection", coll, "--model", "default", "--json", "-q"]) == 0
    capsys.readouterr()
    assert main(["ask", question, "--collection", coll, "--model", "default", "--json"]) == 0
    body = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert body["answer"].startswith("A frog: the collection has"), body
    assert body["citations"], body
    from index.collection import Collection

    with Collection.open(coll, readonly=True) as c:
        cited = [item.uri for cite in body["citations"] if (item := c.get(cite["id"])) is not None]
    assert len(cited) == len(body["citations"])
    assert all(animal in Path(u).stem for u in cited), cited
