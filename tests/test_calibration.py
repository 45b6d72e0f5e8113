"""Score calibration: Platt maps per modality pair make one ranking across modalities."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mm.calibration import Calibration, PairFit, fit_calibration, fit_platt, no_match_threshold
from mm.evaluate import mixed_gallery_metrics


def test_fit_platt_recovers_known_parameters() -> None:
    rng = np.random.default_rng(0)
    s = rng.uniform(-1, 1, 40_000)
    y = rng.random(s.shape) < 1 / (1 + np.exp(-(8.0 * s - 5.0)))
    a, b = fit_platt(s, y)
    assert a == pytest.approx(8.0, rel=0.1)
    assert b == pytest.approx(-5.0, rel=0.1)


def test_fit_platt_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both relevant and irrelevant"):
        fit_platt(np.array([0.1, 0.2]), np.array([1, 1]))


def _shifted_world(n: int = 60, dim: int = 96, seed: int = 0):
    """Text queries whose raw scores against every sound (relevant or not) beat their relevant image."""
    rng = np.random.default_rng(seed)
    concepts = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:n]  # orthonormal concept directions
    u = np.linalg.qr(rng.normal(size=(dim, dim)))[0][n]  # a direction every sound and text shares

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    text = unit(concepts + u)
    image = unit(concepts + 0.35 * rng.normal(size=concepts.shape) / np.sqrt(dim))
    audio = unit(0.2 * concepts + u + 0.05 * rng.normal(size=concepts.shape) / np.sqrt(dim))
    rows, vec = [], {"text": {}, "image": {}, "audio": {}}
    for c in range(n):
        with_sound = c < n // 2  # half the concepts have no sound in the gallery
        row = {"text": f"t{c}", "image": f"i{c}", "label": f"c{c}"}
        vec["text"][f"t{c}"], vec["image"][f"i{c}"] = text[c], image[c]
        if with_sound:
            row["audio"] = f"a{c}"
            vec["audio"][f"a{c}"] = audio[c]
        rows.append(row)

    def encode(modality: str, keys: list[str]) -> np.ndarray:
        return np.stack([vec[modality][k] for k in keys]).astype(np.float32)

    return rows, encode


def test_calibrated_ranking_interleaves_modalities() -> None:
    rows, encode = _shifted_world()
    raw = mixed_gallery_metrics(rows, encode)
    cal, report = fit_calibration(rows, encode)
    assert {"text->image", "text->audio", "image->audio"} <= set(cal.pairs)
    fixed = mixed_gallery_metrics(rows, encode, cal.score)
    # raw scores put every sound above any picture: the relevant image never reaches the top 10
    assert raw["both_at_10"] < 0.2 and raw["sound_when_absent_at_3"] == 1.0
    # one ranking by P(relevant): both relevant items on top, and no sound where the concept has none
    assert fixed["both_at_10"] > 0.9
    assert fixed["sound_when_absent_at_3"] < 0.5
    assert report["threshold"] is not None


def test_calibration_round_trip_and_identity(tmp_path) -> None:
    cal = Calibration(
        {"text->image": PairFit(10.0, -6.0, 100, 5)}, lexical=PairFit(0.5, -2.0), threshold=0.3, split="val"
    )
    cal.save(tmp_path / "calibration.json")
    back = Calibration.load_dir(tmp_path)
    assert back == cal and back.fitted
    assert float(back.score("text", "image", 0.6)) == pytest.approx(0.5)
    assert float(back.score("text", "audio", 0.42)) == pytest.approx(0.42)  # no fit: raw score kept
    assert not back.is_match(0.2) and back.is_match(0.31)
    empty = Calibration.load_dir(tmp_path / "absent")
    assert not empty.fitted and empty.is_match(-1.0)


def test_calibration_rejects_bad_files(tmp_path) -> None:
    bad = {"version": 1, "method": "platt", "pairs": {"text->smell": {"a": 1, "b": 0}}}
    with pytest.raises(ValueError, match="text->smell"):
        Calibration.from_dict(bad)
    bad["pairs"] = {"text->image": {"a": float("nan"), "b": 0}}
    with pytest.raises(ValueError, match="non-finite"):
        Calibration.from_dict(bad)
    with pytest.raises(ValueError, match="refit"):
        Calibration.from_dict({"version": 99, "method": "platt"})


def test_no_match_threshold_keeps_most_matches() -> None:
    match = np.linspace(0.2, 1.0, 100)
    no_match = np.linspace(0.0, 0.5, 100)
    thr, rates = no_match_threshold(match, no_match)
    assert rates["kept"] >= 0.9
    assert np.mean(match >= thr) >= 0.9 and np.mean(no_match < thr) == pytest.approx(rates["flagged"])


def test_checkpoint_brings_its_calibration(tmp_path, embedder) -> None:
    from mm.model import create_model, save_model
    from service.cli import main

    save_model(embedder.model, tmp_path / "ckpt")
    assert not create_model(tmp_path / "ckpt").calibration.fitted
    captions = ["a red apple", "one green apple", "a blue car", "an old car", "a dog", "a barking dog"]
    manifest = tmp_path / "m.jsonl"
    rows = []
    for i, c in enumerate(captions):
        Image.new("RGB", (32, 32), (40 * i, 255 - 40 * i, 90)).save(tmp_path / f"{i}.png")
        rows.append({"id": f"r{i}", "text": c, "image": f"{i}.png", "label": c.split()[-1], "split": "val"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["calibrate", "--manifest", str(manifest), "--model", str(tmp_path / "ckpt")]) == 0
    loaded = create_model(tmp_path / "ckpt").calibration
    assert loaded.fitted and {"text->image", "image->text"} <= set(loaded.pairs)


def _crowded_sounds_world(n: int = 60, clips: int = 8, dim: int = 128, seed: int = 1):
    """Half the concepts have ``clips`` recordings each (as a word spoken in many languages), the other half
    none; image and sound scores separate relevant from irrelevant equally well, so only the base rate
    of relevant pairs (clips / n for sounds, 1 / n for images) differs between the two pairs."""
    rng = np.random.default_rng(seed)
    concepts = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:n]

    def noisy(x: np.ndarray) -> np.ndarray:
        y = x + 0.9 * rng.normal(size=x.shape) / np.sqrt(dim)
        return y / np.linalg.norm(y, axis=-1, keepdims=True)

    rows, vec = [], {"text": {}, "image": {}, "audio": {}}
    for c in range(n):
        rows.append({"text": f"t{c}", "image": f"i{c}", "label": f"c{c}"})
        vec["text"][f"t{c}"], vec["image"][f"i{c}"] = noisy(concepts[c]), noisy(concepts[c])
        for j in range(clips if c < n // 2 else 0):
            rows.append({"audio": f"a{c}.{j}", "label": f"c{c}"})
            vec["audio"][f"a{c}.{j}"] = noisy(concepts[c])

    def encode(modality: str, keys: list[str]) -> np.ndarray:
        return np.stack([vec[modality][k] for k in keys]).astype(np.float32)

    return rows, encode


def test_a_shared_prior_keeps_a_crowded_modality_from_crowding_out_the_others() -> None:
    rows, encode = _crowded_sounds_world()
    own, _ = fit_calibration(rows, encode, common_prior=False)
    shared, report = fit_calibration(rows, encode)
    assert 0 < report["common_prior"] < 1
    # the slopes are the same fit; only the intercepts move, by the gap between the pairs' base rates
    assert shared.pairs["text->audio"].a == own.pairs["text->audio"].a
    gap = (own.pairs["text->audio"].b - shared.pairs["text->audio"].b) - (
        own.pairs["text->image"].b - shared.pairs["text->image"].b
    )
    assert gap > 0.6  # a sound is twice as likely to be relevant as an image here (8 of 240 against 1 of 60)
    with_own = mixed_gallery_metrics(rows, encode, own.score)
    with_shared = mixed_gallery_metrics(rows, encode, shared.score)
    # own priors lift every sound, relevant or not: unrelated sounds fill the top 3 of concepts with none
    assert with_shared["sound_when_absent_at_3"] < with_own["sound_when_absent_at_3"]
    assert with_shared["both_at_10"] >= with_own["both_at_10"] - 0.05
