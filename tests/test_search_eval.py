"""Retrieval measured through the search path (service.search_eval, mm eval --search)."""

from __future__ import annotations

from PIL import Image

from service.search_eval import evaluate_search

WORDS = ["apple", "boat", "cactus", "drum", "eagle", "falcon"]


def _rows(tmp_path):
    rows = []
    for i, w in enumerate(WORDS):
        path = tmp_path / f"{w}.png"
        Image.new("RGB", (32, 32), (30 * i, 200 - 30 * i, 80)).save(path)
        rows.append({"id": w, "image": str(path), "text": f"A {w}.", "lang": "en", "label": w})
        rows.append({"id": f"{w}#fr", "image": str(path), "text": f"Le mot {w}.", "lang": "fr", "label": w})
    return rows


def test_every_mode_is_measured_through_answer(tmp_path, embedder) -> None:
    out = evaluate_search(_rows(tmp_path), embedder)
    assert set(out) == {"vector", "hybrid", "keyword"}
    for mode in out.values():
        assert set(mode) == {"text->image"} and mode["text->image"]["n"] == 2 * len(WORDS)
    # the file names say the concept: word search finds every query's image first, whatever the model
    assert out["keyword"]["text->image"]["R@1"] == 1.0
    assert out["hybrid"]["text->image"]["R@10"] >= out["vector"]["text->image"]["R@10"]


def test_captions_make_exact_caption_queries_trivial_for_words(tmp_path, embedder) -> None:
    rows = [dict(r, image=str(tmp_path / f"x{i}.png")) for i, r in enumerate(_rows(tmp_path))]
    for i, _ in enumerate(rows):
        Image.new("RGB", (32, 32), (i * 9, 90, 90)).save(tmp_path / f"x{i}.png")
    queries = [(r["text"], r["label"]) for r in rows if r["lang"] == "en"]
    names_only = evaluate_search(rows, embedder, modes=("keyword",), queries=queries)
    captioned = evaluate_search(rows, embedder, modes=("keyword",), captions=True, queries=queries)
    assert captioned["keyword"]["text->image"]["R@1"] == 1.0
    assert names_only["keyword"]["text->image"]["R@1"] < 1.0  # x0.png .. x11.png say nothing


def test_cached_encoder_encodes_each_item_once(tmp_path, embedder) -> None:
    from service.search_eval import cached_encoder

    calls: list[list[str]] = []

    class Counting:
        dim = embedder.dim

        def encode(self, modality, keys):
            calls.append(list(keys))
            return embedder.encode(modality, keys)

    rows = _rows(tmp_path)
    enc = cached_encoder(Counting())
    paths = sorted({r["image"] for r in rows})
    first = enc("image", paths)
    again = enc("image", paths[::-1])
    assert calls == [paths]  # the second call encoded nothing
    assert (again == first[::-1]).all()
    out = evaluate_search(rows, embedder, modes=("vector",), encode=enc)
    assert calls == [paths] and out["vector"]["text->image"]["n"] == 2 * len(WORDS)


def test_a_file_the_decoder_refuses_is_left_out_not_fatal(tmp_path, embedder) -> None:
    import numpy as np

    from service.search_eval import usable_rows

    rows = _rows(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(Image.open(tmp_path / "apple.png").tobytes()[:50] + b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    bad_rows = [{"id": "broken", "image": str(broken), "text": "A broken one.", "label": "broken"}]
    kept, encode, refused = usable_rows(rows + bad_rows, embedder, batch=4)
    assert kept == rows and list(refused) == [str(broken)]
    images = [r["image"] for r in rows]
    np.testing.assert_allclose(encode("image", images), embedder.encode("image", images), atol=1e-5)
