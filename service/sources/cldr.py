"""``cldr``: names and keywords of the emoji in every caption language (Debian ``unicode-cldr-core``), drawn
in a second emoji style from Noto Color Emoji (Debian ``fonts-noto-color-emoji``) with Pillow.

Layout: ``/usr/share/unicode/cldr/common/annotations/LANG.xml`` holds, per emoji,
``<annotation cp="🐸">face | frog</annotation>`` (keywords) and ``<annotation cp="🐸" type="tts">frog
</annotation>`` (its short name). Entries the font has no colour glyph for (``{``, arrows) give no image
and are skipped at render time (``cldr_no_image``).

Rows per emoji: image + the name, and image + the other keywords, in each caption language CLDR has
(all eight). The label is the English short name ("frog"), so the emoji shares its split with the word in
every other source; :func:`concept_keys` lets the builder give the same emoji's Twemoji picture the
same label and split when both sources are built together, so no style of a test emoji is trained on.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from functools import lru_cache, partial
from pathlib import Path

from mm.data import split_for
from service.sources.common import NothingToRender, PackageGuard, Plan, pick, provenance

NAME = "cldr"
PACKAGE = "unicode-cldr-core"
FONT_PACKAGE = "fonts-noto-color-emoji"
LICENCE = "Unicode-DFS-2016 (CLDR annotations); Noto Color Emoji: SIL-OFL-1.1 (font), Apache-2.0 (tools)"
DEFAULT_ROOT = Path("/usr/share/unicode/cldr/common/annotations")
DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
INSTALL = "apt-get install unicode-cldr-core fonts-noto-color-emoji"
IMAGE_SIZE = 160
_FONT_SIZE = 109  # the one size the font's colour bitmaps come in
_SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
_MAX_XML_BYTES = 20_000_000
_draw_lock = threading.Lock()  # one FreeType face is shared by the render threads


def concept_key(emoji: str) -> str:
    """An emoji with presentation selectors and skin tones removed: the key its styles share."""
    return "".join(ch for ch in emoji if ord(ch) not in _SKIN_TONES and ch not in "\ufe0f\ufe0e")


def read_annotations(path: Path) -> dict[str, tuple[str | None, list[str]]]:
    """``{emoji: (short name or None, [keywords])}`` from a CLDR annotations file."""
    if path.stat().st_size > _MAX_XML_BYTES:
        raise ValueError(f"{path}: larger than {_MAX_XML_BYTES} bytes")
    out: dict[str, tuple[str | None, list[str]]] = {}
    for el in ET.parse(path).getroot().iter("annotation"):
        cp, text = el.get("cp"), " ".join((el.text or "").split())
        if not cp or not text:
            continue
        name, keywords = out.get(cp, (None, []))
        if el.get("type") == "tts":
            name = text
        else:
            keywords = [k.strip() for k in text.split("|") if k.strip()]
        out[cp] = (name, keywords)
    return out


def scan(
    root: Path,
    languages: tuple[str, ...] = ("en",),
    limit: int | None = None,
    seed: int = 0,
    noto_font: Path = DEFAULT_FONT,
) -> Plan:
    plan = Plan()
    guard = PackageGuard.for_root(PACKAGE, root, (".",), DEFAULT_ROOT)
    font_guard = PackageGuard.for_root(FONT_PACKAGE, noto_font.parent, (noto_font.name,), DEFAULT_FONT.parent)
    plan.provenance = provenance(PACKAGE, LICENCE, root, guard)
    font = font_guard.readable(noto_font, plan.skipped, NAME)
    if font is None:
        return plan
    plan.provenance["font"] = provenance(FONT_PACKAGE, "SIL-OFL-1.1", noto_font, font_guard)
    notes: dict[str, dict[str, tuple[str | None, list[str]]]] = {}
    for lang in dict.fromkeys(("en", *languages)):
        path = guard.readable(root / f"{lang}.xml", plan.skipped, NAME)
        if path is not None:
            notes[lang] = read_annotations(path)
    english = notes.get("en", {})
    emoji = sorted(cp for cp, (name, _) in english.items() if name)
    for cp in pick(emoji, limit, seed, key=lambda e: e):
        label = (english[cp][0] or "").lower()
        stem = "-".join(f"{ord(ch):x}" for ch in cp)
        rel = f"media/cldr/noto/{stem}.png"
        plan.renders[rel] = partial(_render_noto, font, cp)
        common = {"label": label, "category": "emoji", "source": NAME, "split": split_for(label)}
        plan.concepts[concept_key(cp)] = label
        for lang, table in notes.items():
            name, keywords = table.get(cp, (None, []))
            if name:
                plan.rows.append(
                    {"id": f"cldr/{stem}#{lang}", "image": rel, "text": name, "lang": lang} | common
                )
            others = [k for k in keywords if k.lower() != (name or "").lower()]
            if others:
                plan.rows.append(
                    {
                        "id": f"cldr/{stem}#{lang}-keywords",
                        "image": rel,
                        "text": ", ".join(others),
                        "lang": lang,
                    }
                    | common
                )
    return plan


@lru_cache(maxsize=2)
def _font(path: Path):
    import io

    from PIL import ImageFont

    # from bytes, not a file name: given a name it cannot load, Pillow looks for that name among the
    # system's fonts, which would read a font this source was not given
    return ImageFont.truetype(io.BytesIO(path.read_bytes()), _FONT_SIZE)


def _render_noto(font_path: Path, emoji: str, dest: Path) -> None:
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (4 * _FONT_SIZE, 2 * _FONT_SIZE), (0, 0, 0, 0))
    with _draw_lock:
        ImageDraw.Draw(canvas).text((8, 8), emoji, font=_font(font_path), embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise NothingToRender(f"{emoji!r}: no glyph in {font_path.name}")
    if box[2] - box[0] > 1.6 * _FONT_SIZE:  # a sequence the font has no ligature for: several glyphs
        raise NothingToRender(f"{emoji!r}: drawn as several glyphs, not one emoji")
    im = canvas.crop(box)
    scale = (IMAGE_SIZE - 8) / max(im.size)
    im = im.resize(
        (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS
    )
    out = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0, 0))
    out.alpha_composite(im, ((IMAGE_SIZE - im.width) // 2, (IMAGE_SIZE - im.height) // 2))
    out.save(dest, format="PNG")
