"""``ktuberling``: human recordings of KTuberling's words and its sprites (Debian ``ktuberling-data``).

Layout (``/usr/share/ktuberling``): ``sounds/LANG.soundtheme`` maps a sound name to a recording
(``<sound name="egypt_camel" file="fr/egypte_chameau.wav"/>``); ``pics/THEME.theme`` maps an SVG element
id of the theme's gameboard to a sound name (``<object name="eyes_1" sound="eye"/>``).

Rows: one per recording (audio + the English word, ``lang`` "en" because ``lang`` names the language of
``text``; the speaker's language is ``meta.speech_lang``), and one per sprite (image + English word),
rendered from the gameboard SVG by element id (rsvg-convert, large, then cropped). The label is the word
(``egypt_camel`` -> "camel"), so a word's recordings in every language and its sprites share one split,
and the same word in other sources (a Tux Paint camel) lands in the same split too.
"""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from functools import partial
from pathlib import Path

from mm.data import split_for
from service.sources.common import PackageGuard, Plan, pick, provenance, rsvg_render

NAME = "ktuberling"
PACKAGE = "ktuberling-data"
LICENCE = "GPL-2.0-or-later"
DEFAULT_ROOT = Path("/usr/share/ktuberling")
INSTALL = "apt-get install ktuberling-data librsvg2-bin"
SPRITE_SIZE = 256

_PREFIXES = ("robot_workshop_", "butterflies_", "pizzeria_", "egypt_", "moon_", "xmas_", "tv_")
# Sound names whose spoken word the generic rule cannot spell (what the recordings say, in English).
_WORDS = {
    "tuberling": "potato",
    "robin-tux": "robin hood",
    "frier-tux": "friar",
    "little-tux": "little john",
    "maiden-tux": "maiden",
    "prince-tux": "prince",
    "sherif-tux": "sheriff",
    "guard-tux": "guard",
    "kid-tux": "child",
    "whitch-tux": "witch",
    "tux-love": "i love you",
    "tux-idea": "i have an idea",
    "tux-huh": "huh",
    "tux-what": "what",
    "tux-wow": "wow",
    "tux-stare": "i am looking",
    "tux-zzz": "i am sleeping",
    "tux-angry": "i am angry",
    "tux-laugh": "i am laughing",
    "tux-sick": "i am sick",
    "tux-dowe": "pigeon",
    "tux-fly": "flying pigeon",
    "tux-shoot": "shot",
    "tux-bullseye": "target",
    "tux-wanted": "wanted poster",
    "tux-letter-love": "love letter",
    "xmas_tux": "tux",
    "xmas_ball": "christmas ball",
    "xmas_tree": "christmas tree",
    "xmas_present": "present",
    "pizzeria_brocolli": "broccoli",
    "egypt_sphynx": "sphinx",
    "egypt_palmtree": "palm tree",
    "moon_fallingstar": "falling star",
    "moon_moonwalker": "moon rover",
    "moon_ufo": "ufo",
    "tv_lorry_tractor": "lorry tractor",
    "tv_volley_net": "volleyball net",
    "tv_tipper": "tipper truck",
    "butterflies_purple_shape": "purple shape",
}


def word_for(sound: str) -> str:
    """The English word a sound name stands for: ``egypt_camel`` -> "camel", ``olive2`` -> "olive"."""
    if sound in _WORDS:
        return _WORDS[sound]
    name = sound
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    name = name.removeprefix("tux-")
    name = re.sub(r"\d+$", "", name)
    return " ".join(name.replace("_", " ").replace("-", " ").split()).lower()


def _xml(path: Path) -> ET.Element:
    # the package's own small XML files (no entities, no DTD); a parse error skips the file
    return ET.parse(path).getroot()


def scan(
    root: Path, limit: int | None = None, seed: int = 0, rsvg: str = "rsvg-convert", *, verify: bool = True
) -> Plan:
    plan = Plan()
    guard = PackageGuard.for_root(PACKAGE, root, ("sounds", "pics"), DEFAULT_ROOT if verify else None)
    plan.provenance = provenance(PACKAGE, LICENCE, root, guard)

    recordings: list[tuple[str, str, Path]] = []  # (speech lang, sound name, file)
    heard: set[tuple[str, str]] = set()
    for theme in sorted((root / "sounds").glob("*.soundtheme")):
        if guard.readable(theme, plan.skipped, NAME) is None:
            continue
        try:
            lang_el = _xml(theme)
        except ET.ParseError:
            plan.skipped["ktuberling_bad_theme"] += 1
            continue
        lang = lang_el.get("code") or theme.stem
        for el in lang_el.iter("sound"):
            name, rel = el.get("name"), el.get("file")
            if not name or not rel:
                continue
            if (lang, name) in heard:  # some themes list a sound twice (nn: 'bow'); one row each
                plan.skipped["ktuberling_duplicate_sound"] += 1
                continue
            path = guard.readable(root / "sounds" / rel, plan.skipped, NAME)
            if path is not None:
                heard.add((lang, name))
                recordings.append((lang, name, path))

    sprites: list[tuple[str, str, str, Path]] = []  # (theme, element id, sound name, gameboard svg)
    for theme in sorted((root / "pics").glob("*.theme")):
        if guard.readable(theme, plan.skipped, NAME) is None:
            continue
        try:
            board = _xml(theme)
        except ET.ParseError:
            plan.skipped["ktuberling_bad_theme"] += 1
            continue
        svg_name = board.get("gameboard")
        svg = guard.readable(root / "pics" / svg_name, plan.skipped, NAME) if svg_name else None
        if svg is None:
            continue
        seen: set[str] = set()
        for el in board.iter("object"):
            element, sound = el.get("name"), el.get("sound")
            if element and sound and element not in seen:
                seen.add(element)
                sprites.append((theme.stem, element, sound, svg))

    words = sorted({word_for(name) for _, name, _ in recordings} | {word_for(s) for *_, s, _ in sprites})
    keep = set(pick(words, limit, seed, key=lambda w: w))
    for lang, name, path in recordings:
        word = word_for(name)
        if word not in keep:
            continue
        rel = plan.add_file(path, f"media/ktuberling/sounds/{lang}/{path.name}")
        plan.rows.append(
            {
                "id": f"ktuberling/{lang}/{name}",
                "audio": rel,
                "text": word,
                "label": word,
                "category": "spoken word",
                "lang": "en",
                "source": NAME,
                "split": split_for(word),
                "meta": {"speech_lang": lang, "sound": name},
            }
        )
    if sprites and shutil.which(rsvg) is None:
        plan.skipped["ktuberling_no_rsvg"] += len(sprites)
        sprites = []
    for theme_name, element, sound, svg in sprites:
        word = word_for(sound)
        if word not in keep:
            continue
        rel = f"media/ktuberling/sprites/{theme_name}/{_safe(element)}.png"
        plan.renders[rel] = partial(_render_sprite, rsvg, svg, element)
        plan.rows.append(
            {
                "id": f"ktuberling/sprite/{theme_name}/{element}",
                "image": rel,
                "text": word,
                "label": word,
                "category": f"ktuberling/{theme_name}",
                "lang": "en",
                "source": NAME,
                "split": split_for(word),
                "meta": {"sound": sound},
            }
        )
    return plan


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _render_sprite(rsvg: str, svg: Path, element: str, dest: Path) -> None:
    rsvg_render(rsvg, svg, dest, SPRITE_SIZE, element=element)
