"""``scratch``: the named media of Scratch 1.4 (Debian ``scratch``, media CC-BY-SA-3.0).

Layout (``/usr/share/scratch/Media``): ``Sounds/CATEGORY/NAME.wav|mp3`` (114 sounds: animals, effects,
human sounds, instruments, music loops, vocals), ``Costumes/CATEGORY/NAME.png|gif`` (269 pictures; the
``Letters`` alphabets and the ``.sprite`` project files are left out) and
``Backgrounds/CATEGORY/NAME.jpg|gif`` (74 backdrops). The file name is the only description:
``HorseGallop`` -> "horse gallop", ``Cough-female`` -> "a female cough", ``bat1-a`` -> "bat"; People
costumes are mostly first names ("a person: jodi"). The label is the name without its take number,
variant letter or gender, so the takes of one sound and the frames of one costume share a split, and a
Scratch dog shares the split of every other source's dog.
"""

from __future__ import annotations

import re
from pathlib import Path

from mm.data import split_for
from service.sources.common import PackageGuard, Plan, article, pick, provenance

NAME = "scratch"
PACKAGE = "scratch"
LICENCE = "CC-BY-SA-3.0 (Scratch media, per Debian's copyright for scratch)"
DEFAULT_ROOT = Path("/usr/share/scratch/Media")
INSTALL = "apt-get install scratch"
_SOUND_EXTS = (".wav", ".mp3")
_IMAGE_EXTS = (".png", ".gif", ".jpg", ".jpeg")
_SKIP_FOLDERS = ("Letters",)  # alphabets in ten typefaces: letters, not things
_GENDER = ("female", "male")


def name_words(stem: str) -> tuple[str, str | None]:
    """(words, gender) of a Scratch file name: ``Laugh-male2`` -> ("laugh", "male"),
    ``bat1-a`` -> ("bat", None), ``HorseGallop`` -> ("horse gallop", None)."""
    stem = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)
    stem = re.sub(r"[-_ ]+[a-e]$", "", stem)  # frame letters: dog2-a, dog2-b
    tokens = [re.sub(r"\d+$", "", t) for t in re.split(r"[-_ ]+", stem.lower())]
    tokens = [t for t in tokens if t]
    gender = tokens.pop() if len(tokens) > 1 and tokens[-1] in _GENDER else None
    return " ".join(tokens), gender


def sound_caption(category: str, words: str, gender: str | None) -> str:
    who = f"{gender} {words}" if gender else words
    if category == "Animal":
        return f"{article(who)} {who} sound"
    if category == "Music Loops":
        return f"{article(who)} {who} music loop"
    if category == "Vocals":
        return f'a voice singing "{words}"' if " " in words else f"{article(who)} {who} vocal"
    return f"the sound of {article(who)} {who}"


def scan(root: Path, limit: int | None = None, seed: int = 0) -> Plan:
    plan = Plan()
    guard = PackageGuard.for_root(PACKAGE, root, ("Sounds", "Costumes", "Backgrounds"), DEFAULT_ROOT)
    plan.provenance = provenance(PACKAGE, LICENCE, root, guard)
    items: list[tuple[str, str, Path, Path]] = []  # (kind, category, file, file resolved)
    for kind, exts in (("Sounds", _SOUND_EXTS), ("Costumes", _IMAGE_EXTS), ("Backgrounds", _IMAGE_EXTS)):
        for path in sorted((root / kind).rglob("*")):
            rel = path.relative_to(root / kind)
            if path.suffix.lower() not in exts or any(p in _SKIP_FOLDERS for p in rel.parts[:-1]):
                continue
            resolved = guard.readable(path, plan.skipped, NAME)
            if resolved is not None:
                items.append((kind, rel.parts[0] if len(rel.parts) > 1 else "Other", path, resolved))
    for kind, category, path, src in pick(items, limit, seed, key=lambda it: f"{it[0]}/{it[1]}/{it[2].name}"):
        words, gender = name_words(path.stem)
        if not words:
            plan.skipped["scratch_unnamed"] += 1
            continue
        dest = plan.add_file(src, f"media/scratch/{kind.lower()}/{_safe(category)}/{_safe(path.name)}")
        if kind == "Sounds":
            view, text = "audio", sound_caption(category, words, gender)
        elif kind == "Costumes":
            view, text = (
                "image",
                f"a person: {words}" if category == "People" else f"{article(words)} {words}",
            )
        else:
            view, text = "image", f"a backdrop: {words}"
        plan.rows.append(
            {
                "id": f"scratch/{kind.lower()}/{_safe(category)}/{_safe(path.stem)}",
                view: dest,
                "text": text,
                "label": words,
                "category": f"scratch/{kind.lower()}/{category.lower()}",
                "lang": "en",
                "source": NAME,
                "split": split_for(words),
            }
        )
    return plan


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
