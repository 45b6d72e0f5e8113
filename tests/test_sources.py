"""The extra corpus sources (service/sources/*, issue 16) on tiny fake package trees written here, so that
nothing needs the packages; the few checks on the real packages skip only when that package is absent."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mm.data import read_manifest, split_for
from service.samples import build_corpus
from service.sources import ktuberling
from service.sources.common import PackageGuard, RefusedPath

RSVG = shutil.which("rsvg-convert")
NOWHERE = Path("/nonexistent/mm-test")
_OLD = {"tuxpaint_root": NOWHERE, "sonicpi_root": NOWHERE, "twemoji_root": NOWHERE}


def _audio(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.sin(np.arange(1600) / 5.0)).astype(np.float32), 16000, format="WAV")


def _build(out: Path, sources: str, **kw):
    return build_corpus(out, sources=sources, progress=False, **_OLD, **kw)


def _one_split_per_label(rows) -> None:
    splits = defaultdict(set)
    for r in rows:
        splits[r["label"]].add(r["split"])
        assert r["split"] == split_for(r["label"])
    assert all(len(s) == 1 for s in splits.values())


def test_guard_refuses_paths_outside_its_folders(tmp_path):
    inside = tmp_path / "pkg" / "media" / "a.wav"
    _audio(inside)
    outside = tmp_path / "elsewhere.wav"
    _audio(outside)
    link = tmp_path / "pkg" / "media" / "link.wav"
    link.symlink_to(outside)
    guard = PackageGuard.for_root("fake", tmp_path / "pkg", ("media",), default_root=None)
    assert guard.check(inside) == inside.resolve()
    for bad in (outside, link, tmp_path / "pkg" / "media" / ".." / ".." / "elsewhere.wav"):
        with pytest.raises(RefusedPath, match="outside"):
            guard.check(bad)
    listed = PackageGuard("fake", guard.allowed, listed=frozenset())  # as if dpkg did not list the file
    with pytest.raises(RefusedPath, match="not a file of the Debian package"):
        listed.check(inside)


# ---------------------------------------------------------------------------------------------- ktuberling

_SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="200" height="100">
<rect id="hat1" x="10" y="10" width="40" height="20" fill="#c00"/>
<circle id="camel_a" cx="150" cy="50" r="30" fill="#0a0"/>
</svg>"""


@pytest.fixture
def kt_tree(tmp_path: Path) -> Path:
    root = tmp_path / "ktuberling"
    sounds = root / "sounds"
    for rel in ("fr/patate_chapeau.wav", "fr/egypte_chameau.wav", "en/hat.ogg", "en/camel.ogg"):
        _audio(sounds / rel)
    for i in range(12):  # enough words that more than one split shows up
        _audio(sounds / "fr" / f"w{i}.wav")
    outside = tmp_path / "private.wav"
    _audio(outside)
    (sounds / "fr" / "sneaky.wav").symlink_to(outside)
    fr = "".join(f'<sound name="word{chr(97 + i)}" file="fr/w{i}.wav"/>' for i in range(12))
    (sounds / "fr.soundtheme").write_text(
        '<language code="fr"><sound name="hat" file="fr/patate_chapeau.wav"/>'
        '<sound name="egypt_camel" file="fr/egypte_chameau.wav"/>'
        '<sound name="ball" file="../../private.wav"/><sound name="tie" file="fr/sneaky.wav"/>'
        f'<sound name="nose" file="fr/not-shipped.wav"/>{fr}</language>'
    )
    (sounds / "en.soundtheme").write_text(
        '<language code="en"><sound name="hat" file="en/hat.ogg"/>'
        '<sound name="egypt_camel" file="en/camel.ogg"/><sound name="hat" file="en/hat.ogg"/></language>'
    )
    pics = root / "pics"
    pics.mkdir(parents=True)
    (pics / "board.svg").write_text(_SVG)
    (pics / "board.theme").write_text(
        '<playground gameboard="board.svg"><object name="hat1" sound="hat"/>'
        '<object name="camel_a" sound="egypt_camel"/><object name="hat1" sound="hat"/></playground>'
    )
    return root


def test_ktuberling_words():
    assert ktuberling.word_for("egypt_camel") == "camel"
    assert ktuberling.word_for("pizzeria_olive2") == "olive"
    assert ktuberling.word_for("robot_workshop_antenna") == "antenna"
    assert ktuberling.word_for("tux-apple") == "apple"
    assert ktuberling.word_for("tv_breakdown_lorry") == "breakdown lorry"
    assert ktuberling.word_for("whitch-tux") == "witch"


def test_ktuberling_scan_recordings_labels_and_refusals(kt_tree):
    plan = ktuberling.scan(kt_tree, rsvg="no-such-rsvg-convert")
    audio = {r["id"]: r for r in plan.rows if "audio" in r}
    assert set(audio) == {
        "ktuberling/fr/hat",
        "ktuberling/fr/egypt_camel",
        "ktuberling/en/hat",
        "ktuberling/en/egypt_camel",
    } | {f"ktuberling/fr/word{chr(97 + i)}" for i in range(12)}
    camel = audio["ktuberling/fr/egypt_camel"]
    assert camel["text"] == camel["label"] == "camel" and camel["lang"] == "en"
    assert camel["meta"]["speech_lang"] == "fr" and camel["split"] == split_for("camel")
    # ../../private.wav and a symlink to it are refused; a file the theme names but nobody shipped is missing
    assert plan.skipped["ktuberling_refused"] == 2 and plan.skipped["ktuberling_missing_file"] == 1
    assert plan.skipped["ktuberling_duplicate_sound"] == 1  # en lists 'hat' twice: one row (ids stay unique)
    assert all(src.is_relative_to(kt_tree.resolve()) for src in plan.copies.values())
    assert plan.skipped["ktuberling_no_rsvg"] == 2 and not plan.renders  # sprites need rsvg-convert
    assert plan.provenance["licence"] == "GPL-2.0-or-later"
    assert plan.provenance["verified_against_package"] is False  # a fake tree, not the installed package


@pytest.mark.skipif(RSVG is None, reason="rsvg-convert (librsvg2-bin) not installed")
def test_ktuberling_build_renders_sprites_by_element_id(tmp_path, kt_tree):
    out = tmp_path / "corpus"
    counts = _build(out, "ktuberling", ktuberling_root=kt_tree)
    rows = read_manifest(out / "manifest.jsonl")
    sprites = {r["id"]: r for r in rows if r["image"]}
    assert set(sprites) == {"ktuberling/sprite/board/hat1", "ktuberling/sprite/board/camel_a"}
    with Image.open(sprites["ktuberling/sprite/board/hat1"]["image"]) as im:
        px = np.asarray(im.convert("RGBA"))
    assert im.size == (256, 256)
    opaque = px[px[..., 3] > 200]
    assert len(opaque) > 1000 and (opaque[:, 0] > 150).all() and (opaque[:, 1] < 60).all()  # the red hat only
    assert (px[..., 3] > 0).any(axis=0).sum() > 200  # cropped to the element, then fitted large
    _one_split_per_label(rows)
    assert len({r["split"] for r in rows}) >= 2
    assert counts["rendered"] == 2 and counts["licences"]["ktuberling"]["package"] == "ktuberling-data"
    assert json.loads((out / "corpus.json").read_text())["licences"]["ktuberling"]["licence"]
    again = _build(out, "ktuberling", ktuberling_root=kt_tree)
    assert again["rendered"] == 0 and again["copied"] == 0 and again["rows"] == counts["rows"]


@pytest.mark.skipif(not ktuberling.DEFAULT_ROOT.is_dir(), reason="ktuberling-data not installed")
def test_ktuberling_real_package_scan():
    plan = ktuberling.scan(ktuberling.DEFAULT_ROOT, rsvg="no-such-rsvg-convert")
    audio = [r for r in plan.rows if "audio" in r]
    langs = {r["meta"]["speech_lang"] for r in audio}
    assert len(audio) >= 1800 and {"fr", "ca", "de", "en", "es", "it", "nl", "pt"} <= langs
    assert plan.provenance["verified_against_package"] is True and not plan.skipped["ktuberling_refused"]
    assert len({r["label"] for r in audio}) >= 150


# ------------------------------------------------------------------------------------------------ art4apps


def _jpg(path: Path, color=(30, 120, 200)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format="JPEG")


@pytest.fixture
def a4a_tree(tmp_path: Path) -> Path:
    root = tmp_path / "pysiogame"
    lists = root / "i18n" / "custom"
    animals = ["frog", "guinea pig", "cow", "secret"] + [f"bird{chr(97 + i)}" for i in range(10)]
    for word in animals:
        _jpg(root / "res/images/art4apps/animals" / f"{word.replace(' ', '_')}.jpg")
    _jpg(root / "res/images/art4apps/jobs/police.jpg")
    _jpg(root / "res/images/other/secret.jpg")  # another folder of the package: never read
    (root / "res/images/art4apps/animals/secret.jpg").unlink()
    (root / "res/images/art4apps/animals/secret.jpg").symlink_to(root / "res/images/other/secret.jpg")
    sentinel = tmp_path / "executed"
    (lists / "a4a_py").mkdir(parents=True)
    (lists / "a4a_words.py").write_text(
        f"import os\nos.system('touch {sentinel}')\nd = dict()\n"
        f'd["a4a_animals"] = {animals!r}\nd["a4a_jobs"] = ["policeman"]\n'
    )
    (lists / "a4a_py" / "en_GB.py").write_text(
        f'd = dict()\nd["a4a_animals"] = {animals!r}\nd["a4a_jobs"] = ["policeman"]\n'
    )
    fr = ["grenouille", "cochon d'inde", "vache", "secret"] + [f"oiseau{i}" for i in range(10)]
    (lists / "a4a_py" / "fr.py").write_text(
        f'd = dict()\nd["a4a_animals"] = {fr!r}\nd["a4a_jobs"] = ["policier"]\n'
    )
    es = ["rana", "<guinea pig>", ""] + ["x"] * 11
    (lists / "a4a_py" / "es.py").write_text(
        f'd = dict()\nd["a4a_animals"] = {es!r}\nd["a4a_jobs"] = ["policía"]\n'
    )
    return root


def test_art4apps_words_per_language_and_only_its_folder(tmp_path, a4a_tree):
    from service.sources import art4apps

    plan = art4apps.scan(a4a_tree, languages=("en", "fr", "es", "nl"))
    by_id = {r["id"]: r for r in plan.rows}
    assert not (tmp_path / "executed").exists()  # the word lists are parsed, never run
    frog = by_id["art4apps/animals/frog"]
    assert (
        frog["text"] == frog["label"] == "frog"
        and frog["lang"] == "en"
        and frog["split"] == split_for("frog")
    )
    assert by_id["art4apps/animals/frog#fr"]["text"] == "grenouille"
    assert by_id["art4apps/animals/frog#es"]["text"] == "rana"
    assert by_id["art4apps/animals/guinea_pig#fr"]["label"] == "guinea pig"
    assert "art4apps/animals/guinea_pig#es" not in by_id and "art4apps/animals/cow#es" not in by_id
    assert by_id["art4apps/jobs/police"]["text"] == "policeman"  # a4a_words' word for the file police.jpg
    assert not any(k.endswith("#nl") for k in by_id)  # no Dutch list in the package
    assert not any("secret" in k for k in by_id) and plan.skipped["art4apps_refused"] == 1
    assert plan.skipped["art4apps_no_es"] == 2
    assert all(
        src.is_relative_to((a4a_tree / "res/images/art4apps").resolve()) for src in plan.copies.values()
    )


def test_art4apps_build(tmp_path, a4a_tree):
    out = tmp_path / "corpus"
    counts = _build(out, "art4apps", art4apps_root=a4a_tree, languages="en,fr")
    rows = read_manifest(out / "manifest.jsonl")
    _one_split_per_label(rows)
    assert counts["by_lang"] == {"en": 14, "fr": 14} and len({r["split"] for r in rows}) >= 2
    assert counts["licences"]["art4apps"]["package"] == "pysiogame"


@pytest.mark.skipif(
    not Path("/usr/share/games/pysiogame/res/images/art4apps").is_dir(), reason="no pysiogame"
)
def test_art4apps_real_package_scan():
    from service.sources import art4apps

    plan = art4apps.scan(art4apps.DEFAULT_ROOT, languages=("en", "de", "fr", "it", "es", "pt", "ca"))
    by_lang = defaultdict(int)
    for r in plan.rows:
        by_lang[r["lang"]] += 1
    assert by_lang["en"] == by_lang["fr"] == 585 and by_lang["es"] >= 500 and by_lang["ca"] >= 490
    assert plan.provenance["verified_against_package"] is True and not plan.skipped["art4apps_refused"]


# ---------------------------------------------------------------------------------------------------- cldr

NOTO = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


def _annotations(path: Path, entries: dict[str, tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(
        f'<annotation cp="{cp}">{kw}</annotation><annotation cp="{cp}" type="tts">{name}</annotation>'
        for cp, (name, kw) in entries.items()
    )
    path.write_text(f"<ldml><annotations>{body}</annotations></ldml>", encoding="utf-8")


@pytest.fixture
def cldr_tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "annotations"
    _annotations(
        root / "en.xml", {"🐸": ("frog", "face | frog"), "👍": ("thumbs up", "+1 | hand | thumbs up")}
    )
    _annotations(root / "fr.xml", {"🐸": ("grenouille", "animal | grenouille | tête")})
    outside = tmp_path / "elsewhere.xml"
    _annotations(outside, {"🐸": ("leaked", "leaked")})
    (root / "de.xml").symlink_to(outside)
    font = tmp_path / "fonts" / "NotoColorEmoji.ttf"
    font.parent.mkdir()
    font.write_bytes(b"not a font")
    return {"cldr_root": root, "noto_font": font}


def test_cldr_names_keywords_languages_and_refusal(cldr_tree):
    from service.sources import cldr

    plan = cldr.scan(cldr_tree["cldr_root"], ("en", "fr", "de"), noto_font=cldr_tree["noto_font"])
    by_id = {r["id"]: r for r in plan.rows}
    assert by_id["cldr/1f438#en"]["text"] == "frog" and by_id["cldr/1f438#fr"]["text"] == "grenouille"
    assert by_id["cldr/1f438#fr-keywords"]["text"] == "animal, tête"
    assert by_id["cldr/1f44d#en-keywords"]["text"] == "+1, hand"
    assert {r["label"] for r in plan.rows} == {"frog", "thumbs up"}
    assert all(
        r["split"] == split_for(r["label"]) and r["image"] == f"media/cldr/noto/{r['id'][5:10]}.png"
        for r in plan.rows
    )
    assert not any(r["lang"] == "de" for r in plan.rows) and plan.skipped["cldr_refused"] == 1
    assert (
        cldr.concept_key("👍🏽") == cldr.concept_key("👍\ufe0f") == "👍"
        and plan.concepts["👍"] == "thumbs up"
    )


def test_cldr_gives_twemoji_the_same_concept(tmp_path, cldr_tree):
    emoji = tmp_path / "emoji"
    for stem in ("1f438", "1f44d-1f3fb", "1f600"):
        emoji.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(emoji / f"{stem}.png")
    kw = {**_OLD, "twemoji_root": emoji, **cldr_tree}
    counts = build_corpus(tmp_path / "c", sources="twemoji,cldr", languages="en,fr", progress=False, **kw)
    rows = {r["id"]: r for r in read_manifest(tmp_path / "c" / "manifest.jsonl")}
    assert rows["twemoji/1f438"]["label"] == "frog" and rows["twemoji/1f438"]["split"] == split_for("frog")
    assert rows["twemoji/1f44d-1f3fb"]["label"] == "thumbs up"
    assert rows["twemoji/1f600"]["label"] == "grinning face"  # no CLDR entry here: its Unicode name stays
    assert counts["skipped"].get("cldr_render_failed") == 2, counts[
        "skipped"
    ]  # "not a font": those images are skipped, not faked
    alone = build_corpus(tmp_path / "t", sources="twemoji", progress=False, **{**_OLD, "twemoji_root": emoji})
    assert alone["rows"] == 3
    assert {r["label"] for r in read_manifest(tmp_path / "t" / "manifest.jsonl")} >= {"frog face"}


@pytest.mark.skipif(not NOTO.is_file(), reason="fonts-noto-color-emoji not installed")
def test_cldr_renders_noto_emoji(tmp_path, cldr_tree):
    out = tmp_path / "c"
    counts = _build(out, "cldr", cldr_root=cldr_tree["cldr_root"], languages="en,fr")
    rows = read_manifest(out / "manifest.jsonl")
    assert counts["rendered"] == 2 and counts["by_lang"] == {"en": 4, "fr": 2}
    with Image.open(rows[0]["image"]) as im:
        px = np.asarray(im.convert("RGBA")).astype(int)
    seen = px[px[..., 3] > 200]
    assert im.size == (160, 160) and len(seen) > 5000
    assert np.ptp(seen[:, :3], axis=1).mean() > 30  # colour, not a grey box
    assert counts["licences"]["cldr"]["font"]["package"] == "fonts-noto-color-emoji"


@pytest.mark.skipif(not Path("/usr/share/unicode/cldr/common/annotations/en.xml").is_file(), reason="no CLDR")
def test_cldr_real_package_scan():
    from service.sources import cldr

    langs = ("en", "fr", "de", "es", "it", "pt", "nl", "ca")
    plan = cldr.scan(cldr.DEFAULT_ROOT, langs, noto_font=NOTO)
    names = defaultdict(int)
    for r in plan.rows:
        if not r["id"].endswith("-keywords"):
            names[r["lang"]] += 1
    assert all(names[lang] >= 1800 for lang in langs), names
    assert plan.provenance["verified_against_package"] is True and not plan.skipped["cldr_refused"]


# ----------------------------------------------------------------------------------------------- gameicons


def _icons_package(root: Path, name="@iconify-json/game-icons", version="1.2.4") -> Path:
    root.mkdir(parents=True)
    (root / "package.json").write_text(json.dumps({"name": name, "version": version, "license": "CC-BY-3.0"}))
    square = '<path fill="currentColor" d="M64 64h384v384H64z"/>'
    icons = {f"frog-{chr(97 + i)}": {"body": square} for i in range(10)}
    icons |= {"3d-glasses": {"body": square}, "secret": {"body": square, "hidden": True}}
    (root / "icons.json").write_text(json.dumps({"prefix": "game-icons", "icons": icons, "width": 512}))
    return root


def test_gameicons_names_and_refusals(tmp_path):
    from service.sources import gameicons

    root = _icons_package(tmp_path / "game-icons")
    plan = gameicons.scan(root, rsvg=RSVG or "true")
    by_id = {r["id"]: r for r in plan.rows}
    assert set(by_id) == {"gameicons/3d-glasses"} | {f"gameicons/frog-{chr(97 + i)}" for i in range(10)}
    glasses = by_id["gameicons/3d-glasses"]
    assert glasses["label"] == glasses["text"] == "3d glasses" and glasses["split"] == split_for("3d glasses")
    assert plan.skipped["gameicons_hidden"] == 1 and plan.provenance["licence"].startswith("CC-BY-3.0")
    other = _icons_package(tmp_path / "other", name="@iconify-json/mdi")
    with pytest.raises(RefusedPath, match="not the npm package"):
        gameicons.scan(other)
    with pytest.raises(ValueError, match="unknown source"):
        _build(tmp_path / "c", "gameicons,fontawesome", gameicons_root=root)


@pytest.mark.skipif(RSVG is None, reason="rsvg-convert (librsvg2-bin) not installed")
def test_gameicons_build_renders_black_silhouettes(tmp_path):
    root = _icons_package(tmp_path / "game-icons")
    out = tmp_path / "c"
    counts = _build(out, "gameicons", gameicons_root=root)
    rows = read_manifest(out / "manifest.jsonl")
    assert counts["rendered"] == len(rows) == 11 and len({r["split"] for r in rows}) >= 2
    with Image.open(rows[0]["image"]) as im:
        px = np.asarray(im.convert("RGBA"))
    assert (
        im.size == (256, 256) and px[128, 128, 3] == 255 and px[128, 128, :3].max() == 0 and px[2, 2, 3] == 0
    )
    assert _build(out, "gameicons", gameicons_root=root)["rendered"] == 0  # resumed: nothing redrawn


@pytest.mark.skipif(
    not (Path(__file__).parents[1] / ".npm/node_modules/@iconify-json/game-icons/icons.json").is_file(),
    reason="@iconify-json/game-icons not installed (make npm)",
)
def test_gameicons_real_package_scan():
    from service.sources import gameicons

    plan = gameicons.scan(gameicons.DEFAULT_ROOT, rsvg=RSVG or "true")
    assert len(plan.rows) == 4133 and plan.provenance["version"] == gameicons.VERSION


# ------------------------------------------------------------------------------------------------- scratch


def test_scratch_names():
    from service.sources.scratch import name_words, sound_caption

    assert name_words("Laugh-male2") == ("laugh", "male")
    assert name_words("bat1-a") == ("bat", None)
    assert name_words("HorseGallop") == ("horse gallop", None)
    assert name_words("boy4-walking-e") == ("boy walking", None)
    assert sound_caption("Human", "cough", "female") == "the sound of a female cough"
    assert sound_caption("Animal", "owl", None) == "an owl sound"


@pytest.fixture
def scratch_tree(tmp_path: Path) -> Path:
    root = tmp_path / "Media"
    _audio(root / "Sounds/Animal/Dog1.wav")
    _audio(root / "Sounds/Animal/Dog2.wav")
    _audio(root / "Sounds/Human/Cough-female.wav")
    for stem in ("dog1-a", "dog1-b", "cat1", "lion1-a") + tuple(f"thing{chr(97 + i)}" for i in range(10)):
        _jpg(root / "Costumes/Animals" / f"{stem}.png")
    _jpg(root / "Costumes/Letters/auto/A.gif")  # alphabets are left out
    (root / "Costumes/Animals/Dancer.sprite").write_bytes(b"squeak")  # project files are left out
    _jpg(root / "Backgrounds/Nature/forest.jpg")
    outside = tmp_path / "holiday.jpg"
    _jpg(outside)
    (root / "Backgrounds/Nature/holiday.jpg").symlink_to(outside)
    return root


def test_scratch_scan_and_build(tmp_path, scratch_tree):
    from service.sources import scratch

    plan = scratch.scan(scratch_tree)
    by_id = {r["id"]: r for r in plan.rows}
    assert by_id["scratch/sounds/Animal/Dog1"]["text"] == "a dog sound"
    assert by_id["scratch/sounds/Human/Cough-female"]["label"] == "cough"
    assert (
        by_id["scratch/costumes/Animals/dog1-b"]["label"]
        == by_id["scratch/sounds/Animal/Dog2"]["label"]
        == "dog"
    )
    assert by_id["scratch/backgrounds/Nature/forest"]["text"] == "a backdrop: forest"
    assert not any("Letters" in k or "Dancer" in k or "holiday" in k for k in by_id)
    assert plan.skipped["scratch_refused"] == 1
    counts = _build(tmp_path / "c", "scratch", scratch_root=scratch_tree)
    rows = read_manifest(tmp_path / "c" / "manifest.jsonl")
    _one_split_per_label(rows)
    assert (
        counts["by_modality"] == {"audio+text": 3, "image+text": 15} and len({r["split"] for r in rows}) >= 2
    )
    assert counts["licences"]["scratch"]["licence"].startswith("CC-BY-SA-3.0")


@pytest.mark.skipif(not Path("/usr/share/scratch/Media/Sounds").is_dir(), reason="scratch not installed")
def test_scratch_real_package_scan():
    from service.sources import scratch

    plan = scratch.scan(scratch.DEFAULT_ROOT)
    audio = [r for r in plan.rows if "audio" in r]
    assert len(audio) == 114 and len(plan.rows) - len(audio) >= 330
    assert plan.provenance["verified_against_package"] is True and not plan.skipped["scratch_refused"]


# ------------------------------------------------------------------------------ the original four sources


def test_original_sources_refuse_files_outside_their_package(tmp_path):
    tux = tmp_path / "stamps"
    for i, word in enumerate(("frog", "cat")):
        (tux / "animals").mkdir(parents=True, exist_ok=True)
        (tux / "animals" / f"{word}.txt").write_text(f"A {word}.\n")
        _jpg(tux / "animals" / f"{word}.png", (i * 100, 0, 0))
    private = tmp_path / "private.png"
    _jpg(private)
    (tux / "animals" / "cat.png").unlink()
    (tux / "animals" / "cat.png").symlink_to(private)
    counts = build_corpus(
        tmp_path / "c", sources="tuxpaint", progress=False, **{**_OLD, "tuxpaint_root": tux}
    )
    rows = read_manifest(tmp_path / "c" / "manifest.jsonl")
    assert [r["label"] for r in rows] == ["frog"] and counts["skipped"]["tuxpaint_refused"] == 1
    assert counts["licences"]["tuxpaint"]["package"] == "tuxpaint-stamps-default"


def test_cli_builds_an_extra_source_and_reports_licences(tmp_path, scratch_tree, capsys):
    from service import cli

    out = tmp_path / "corpus"
    nowhere = [f"--{name}-root={NOWHERE}" for name in ("tuxpaint", "sonicpi", "twemoji")]
    argv = ["samples", "build", str(out), "--no-progress", "--scratch-root", str(scratch_tree), *nowhere]
    assert cli.main([*argv, "--sources", "scratch"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["by_source"] == {"scratch": 18} and summary["licences"]["scratch"].startswith("CC-BY-SA")
    assert set(summary["seconds_by_source"]) == {"scratch"}
    assert cli.main([*argv, "--sources", "scratch,flickr"]) == 2
    assert "ktuberling" in capsys.readouterr().err  # the refusal lists the sources there are
