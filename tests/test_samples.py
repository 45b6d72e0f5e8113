"""The sample corpus builder (service/samples.py) and the manifest reader (mm/data.py), on fake trees
that mimic the Debian/PyPI layouts, so that nothing here needs the packages installed."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import stat
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mm.data import SPLITS, modality_key, read_manifest, split_for
from service.samples import build_corpus, caption_label, emoji_caption, parse_stamp_text, sonicpi_caption

NOWHERE = Path("/nonexistent/mm-test")


def _png(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)


def _audio(path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tone = (0.1 * np.sin(np.arange(1600) / 5.0)).astype(np.float32)
    sf.write(path, tone, 16000, format=fmt)


def _stamp(root: Path, rel: str, english: str, translations: dict[str, str], png=True, svg=False) -> Path:
    stem = root / rel
    stem.parent.mkdir(parents=True, exist_ok=True)
    lines = [english] + [f"{lang}.utf8={text}" for lang, text in translations.items()]
    stem.with_name(stem.name + ".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if png:
        _png(stem.with_name(stem.name + ".png"))
    if svg:
        stem.with_name(stem.name + ".svg").write_text("<svg/>")
    return stem


@pytest.fixture
def trees(tmp_path: Path) -> dict[str, Path]:
    tux = tmp_path / "stamps"
    frog = _stamp(tux, "animals/amphibians/frog", "A frog.", {"fr": "Une grenouille.", "de": "Ein Frosch."})
    _audio(frog.with_name("frog.ogg"), "OGG")
    _audio(frog.with_name("frog_desc.ogg"), "OGG")
    _audio(frog.with_name("frog_desc_fr.ogg"), "OGG")
    _audio(frog.with_name("frog_desc_ru.ogg"), "OGG")  # a language not asked for: ignored
    _stamp(tux, "animals/amphibians/frog-1", "A frog.", {"fr": "Une grenouille."})
    _stamp(tux, "household/calculator", "A calculator.  6x7=42", {"fr": "Une calculatrice. 6x7=42"})
    _stamp(tux, "household/elfhat", "An elf hat.", {}, png=False, svg=True)
    for i in range(12):  # enough concepts that more than one split shows up
        _stamp(tux, f"plants/flower{i}", f"A flower number {i}.", {"fr": f"Une fleur {i}."})
    sonic = tmp_path / "sonic"
    for name in ("drum_tom_mid_hard", "tabla_ghe1", "tabla_ghe2", "bd_808"):
        _audio(sonic / f"{name}.flac", "FLAC")
    emoji = tmp_path / "emoji"
    for stem in ("1f600", "1f44d", "1f44d-1f3fb", "1f1fa-1f1f8", "10fffd"):  # the last has no name
        _png(emoji / f"{stem}.png")
    return {"tuxpaint_root": tux, "sonicpi_root": sonic, "twemoji_root": emoji}


def _build(out: Path, trees, **kw):
    kw.setdefault("sources", "tuxpaint,sonicpi,twemoji")
    kw.setdefault("languages", "en,fr")
    return build_corpus(out, progress=False, **trees, **kw)


def test_parse_stamp_text_keeps_equals_in_english_line():
    english, tr = parse_stamp_text(
        "A calculator.  6x7=42\nfr.utf8=Une calculatrice.\nca@valencia.utf8=Una.\n"
    )
    assert english == "A calculator.  6x7=42"
    assert tr == {"fr": "Une calculatrice.", "ca@valencia": "Una."}
    assert caption_label("An Old  frog.") == "old frog"


def test_sonicpi_and_emoji_captions():
    assert sonicpi_caption("drum_tom_mid_hard") == ("a hard mid tom drum hit", "drum")
    assert sonicpi_caption("bd_808") == ("an 808 bass drum kick", "bass drum")
    assert sonicpi_caption("bass_dnb_f")[0] == "a drum and bass bass sound in F"
    assert emoji_caption([0x1F600]) == ("grinning face", "grinning face")
    assert emoji_caption([0x1F44D, 0x1F3FB]) == ("thumbs up sign: light skin tone", "thumbs up sign")
    assert emoji_caption([0x1F1FA, 0x1F1F8]) == ("flag of US", "flag of US")
    assert emoji_caption([0x10FFFD]) is None


def test_build_rows_are_valid_and_grouped_by_concept(tmp_path, trees):
    out = tmp_path / "corpus"
    counts = _build(out, trees)
    rows = read_manifest(out / "manifest.jsonl")
    assert counts["rows"] == len(rows)
    assert json.loads((out / "corpus.json").read_text())["rows"] == len(rows)
    by_id = {r["id"]: r for r in rows}

    frog = by_id["tuxpaint/animals/amphibians/frog"]
    assert modality_key(frog) == "image+audio+text" and frog["text"] == "A frog." and frog["label"] == "frog"
    assert frog["category"] == "animals/amphibians"
    assert Path(frog["image"]).is_file() and Path(frog["image"]).is_relative_to(out.resolve())
    assert by_id["tuxpaint/animals/amphibians/frog#fr"]["text"] == "Une grenouille."
    assert modality_key(by_id["tuxpaint/animals/amphibians/frog#desc_fr"]) == "audio+text"
    assert "tuxpaint/animals/amphibians/frog#de" not in by_id  # de not asked for
    assert not any(r["id"].endswith("desc_ru") for r in rows)
    assert by_id["tuxpaint/household/calculator"]["text"] == "A calculator.  6x7=42"
    assert by_id["twemoji/1f44d-1f3fb"]["label"] == by_id["twemoji/1f44d"]["label"]
    assert by_id["sonicpi/tabla_ghe1"]["split"] == by_id["sonicpi/tabla_ghe2"]["split"]
    assert not any("elfhat" in r["id"] for r in rows)
    assert counts["skipped"] == {"tuxpaint_svg_only": 1, "twemoji_unnamed": 1}

    raw = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(not Path(r[v]).is_absolute() for r in raw for v in ("image", "audio") if v in r)
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[r["label"]].add(r["split"])
        assert r["split"] == split_for(r["label"]) or r["source"] == "sonicpi"
    assert all(len(s) == 1 for s in splits_of.values())  # no concept straddles two splits
    assert len({r["split"] for r in rows}) >= 2
    assert sum(counts["by_source"].values()) == sum(counts["by_split"].values()) == len(rows)


def test_second_build_reuses_files_and_is_identical(tmp_path, trees):
    out = tmp_path / "corpus"
    first = _build(out, trees)
    manifest = (out / "manifest.jsonl").read_bytes()
    second = _build(out, trees)
    assert first["copied"] > 0 and second["copied"] == 0
    assert (out / "manifest.jsonl").read_bytes() == manifest
    assert not list(out.rglob("*.part"))


def test_limit_is_a_seeded_sample(tmp_path, trees):
    a = _build(tmp_path / "a", trees, sources="tuxpaint", limit=5, seed=1)
    b = _build(tmp_path / "b", trees, sources="tuxpaint", limit=5, seed=1)
    ids_a = [r["id"] for r in read_manifest(tmp_path / "a" / "manifest.jsonl")]
    assert ids_a == [r["id"] for r in read_manifest(tmp_path / "b" / "manifest.jsonl")]
    assert len({i.split("#")[0] for i in ids_a}) <= 5 and a["rows"] == b["rows"]


def test_split_for_is_stable_and_roughly_80_10_10():
    keys = [f"concept-{i}" for i in range(2000)]
    splits = [split_for(k) for k in keys]
    assert splits == [split_for(k) for k in keys]
    share = {s: splits.count(s) / len(splits) for s in SPLITS}
    assert 0.75 < share["train"] < 0.85 and 0.07 < share["val"] < 0.13 and 0.07 < share["test"] < 0.13


def test_missing_sources_warn_and_nothing_found_raises(tmp_path, trees, caplog):
    with caplog.at_level(logging.WARNING, logger="service.samples"):
        counts = _build(tmp_path / "c", {**trees, "sonicpi_root": NOWHERE})
    assert "sonicpi" not in counts["by_source"] and "Sonic Pi samples not found" in caplog.text
    empty = {"tuxpaint_root": NOWHERE, "sonicpi_root": NOWHERE, "twemoji_root": NOWHERE}
    with pytest.raises(FileNotFoundError, match="no sample media found"):
        _build(tmp_path / "d", empty)
    with pytest.raises(ValueError, match="unknown source"):
        _build(tmp_path / "e", trees, sources="tuxpaint,flickr")


def _fake_espeak(tmp_path: Path) -> Path:
    """A stand-in for espeak-ng that writes a short WAV to the path after -w."""
    template = tmp_path / "template.wav"
    _audio(template, "WAV")
    script = tmp_path / "fake-espeak"
    script.write_text(f'#!/bin/sh\ncat >/dev/null\ncp "{template}" "$6"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_speech_rows_follow_their_stamp(tmp_path, trees):
    out = tmp_path / "corpus"
    kw = {"sources": "tuxpaint,speech", "espeak": str(_fake_espeak(tmp_path)), "speech_languages": "en,fr"}
    counts = _build(out, trees, **kw)
    rows = read_manifest(out / "manifest.jsonl")
    speech = [r for r in rows if r["source"] == "speech"]
    assert counts["synthesised"] == len(speech) > 0
    frog = next(r for r in speech if r["id"] == "speech/fr/animals/amphibians/frog")
    assert frog["text"] == "Une grenouille." and frog["split"] == split_for("frog") and frog["meta"]["voice"]
    assert sf.info(frog["audio"]).samplerate == 16000
    again = _build(out, trees, **kw)
    assert again["synthesised"] == 0 and again["rows"] == counts["rows"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_real_espeak_writes_readable_wav(tmp_path):
    tux = tmp_path / "stamps"
    _stamp(tux, "animals/frog", "A frog.", {})
    counts = build_corpus(
        tmp_path / "c", sources="speech", tuxpaint_root=tux, progress=False, sonicpi_root=NOWHERE
    )
    (row,) = read_manifest(tmp_path / "c" / "manifest.jsonl")
    assert counts["by_source"] == {"speech": 1}
    data, sr = sf.read(row["audio"])
    assert sr > 8000 and len(data) > sr // 10 and np.abs(data).max() > 0


def _write(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_read_manifest_user_rows_and_errors(tmp_path):
    _png(tmp_path / "img" / "a.png")
    good = {"id": "a", "image": "img/a.png", "text": "a red square", "label": "square"}
    (row,) = read_manifest(_write(tmp_path, [good]))
    assert row["image"] == str(tmp_path / "img" / "a.png") and row["split"] == split_for("square")
    assert row["audio"] is None and row["meta"] == {}

    cases = {
        "not valid JSON": ["{oops"],
        "at least two": [{"id": "b", "text": "only text"}],
        "file not found": [{"id": "c", "image": "missing.png", "text": "x"}],
        "'split' must be": [{**good, "split": "holdout"}],
        "duplicate id": [good, good],
        "unknown key": [{**good, "imgae": "img/a.png"}],
        "'text' must be": [{"id": "d", "image": "img/a.png", "audio": "img/a.png", "text": ""}],
    }
    for message, rows in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            read_manifest(_write(tmp_path, rows))
        assert f"m.jsonl:{len(rows)}" in str(err.value)  # names the offending line
    assert read_manifest(_write(tmp_path, [good | {"image": "missing.png"}]), check_files=False)


def test_cli_samples_build(tmp_path, trees, capsys):
    from service.cli import samples as cli
    from service.cli.common import UsageError

    parser = argparse.ArgumentParser(prog="mm")
    cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "corpus"
    argv = ["samples", "build", str(out), "--sources", "sonicpi", "--no-progress"]
    args = parser.parse_args([*argv, "--sonicpi-root", str(trees["sonicpi_root"])])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["by_source"] == {"sonicpi": 4}
    bad = parser.parse_args(["samples", "build", str(out), "--sources", "nope", "--no-progress"])
    with pytest.raises(UsageError, match="unknown source"):
        bad.func(bad)


def test_mm_main_runs_samples_build(tmp_path, trees, capsys):
    from service import cli

    assert "samples" in cli.COMMANDS
    out = tmp_path / "corpus"
    argv = ["samples", "build", str(out), "--sources", "twemoji", "--no-progress"]
    assert cli.main([*argv, "--twemoji-root", str(trees["twemoji_root"])]) == 0
    assert json.loads(capsys.readouterr().out)["by_source"] == {"twemoji": 4}
    assert cli.main([*argv, "--twemoji-root", str(NOWHERE)]) == 1
    assert "no sample media found" in capsys.readouterr().err
    assert cli.main([*argv, "--limit", "0"]) == 2
