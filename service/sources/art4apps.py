"""``art4apps``: the Art4Apps illustrations that Debian ``pysiogame`` carries, with their words in seven
caption languages.

Only two parts of the package are read (DATA.md: "its art4apps image folder only"): the images,
``res/images/art4apps/CATEGORY/WORD.jpg`` (585 in 12 categories), and the Art4Apps word lists that name
them, ``i18n/custom/a4a_words.py`` (the file-name words, one list per category) and
``i18n/custom/a4a_py/LANG.py`` (the same lists translated, index for index; ``<word>`` or an empty
string where a translation is missing). The word lists are Python source: they are parsed with ``ast``
and only literal ``d["a4a_CATEGORY"] = [...]`` assignments are read, never executed.

Rows: image + the word per language (en from ``en_GB``, de, fr, it: 585; es 504; pt, ca 492); the
label is the English word, so an art4apps frog shares its split with every other source's frog.
"""

from __future__ import annotations

import ast
from pathlib import Path

from mm.data import split_for
from service.sources.common import PackageGuard, Plan, pick, provenance

NAME = "art4apps"
PACKAGE = "pysiogame"
LICENCE = "public-domain per Debian's copyright for pysiogame images/*; word lists GPL-3+ (pysiogame)"
DEFAULT_ROOT = Path("/usr/share/games/pysiogame")
INSTALL = "apt-get install pysiogame"
IMAGES = "res/images/art4apps"
WORDS = "i18n/custom/a4a_words.py"
LISTS = "i18n/custom/a4a_py"
# caption language -> word-list module; nl has no list
LANG_FILES = {"en": "en_GB", "de": "de", "fr": "fr", "it": "it", "es": "es", "pt": "pt", "ca": "ca"}
# a4a_words entries whose image file has another name
_FILE_NAMES = {
    "trainer": "sneaker",
    "to drink": "drink",
    "policeman": "police",
    "magician": "magic",
    "office worker": "office",
    "ballet dancer": "ballet",
}
_MAX_LIST_BYTES = 2_000_000


def read_word_lists(path: Path) -> dict[str, list[str]]:
    """``{"a4a_animals": [...], ...}`` from a word-list module, by parsing (not running) it."""
    if path.stat().st_size > _MAX_LIST_BYTES:
        raise ValueError(f"{path}: larger than {_MAX_LIST_BYTES} bytes, not a word list")
    out: dict[str, list[str]] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if not (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)):
            continue
        try:
            key, value = ast.literal_eval(target.slice), ast.literal_eval(node.value)
        except ValueError:
            continue
        if isinstance(key, str) and key.startswith("a4a_") and isinstance(value, list):
            out[key] = [v if isinstance(v, str) else "" for v in value]
    return out


def _usable(word: str) -> str | None:
    word = " ".join(word.split())
    return None if not word or word.startswith("<") else word


def scan(root: Path, languages: tuple[str, ...] = ("en",), limit: int | None = None, seed: int = 0) -> Plan:
    plan = Plan()
    guard = PackageGuard.for_root(PACKAGE, root, (IMAGES, WORDS, LISTS), DEFAULT_ROOT)
    plan.provenance = provenance(PACKAGE, LICENCE, root, guard)
    words_file = guard.readable(root / WORDS, plan.skipped, NAME)
    if words_file is None:
        return plan
    base = read_word_lists(words_file)
    lists: dict[str, dict[str, list[str]]] = {}
    for lang in dict.fromkeys(("en", *languages)):
        module = LANG_FILES.get(lang)
        path = guard.readable(root / LISTS / f"{module}.py", plan.skipped, NAME) if module else None
        if path is not None:
            lists[lang] = read_word_lists(path)

    items: list[tuple[str, int, Path]] = []  # (category, index in the lists, image)
    for key, names in sorted(base.items()):
        category = key.removeprefix("a4a_")
        for i, name in enumerate(names):
            if not name:
                continue
            stem = _FILE_NAMES.get(name, name).replace(" ", "_")
            image = guard.readable(root / IMAGES / category / f"{stem}.jpg", plan.skipped, NAME)
            if image is not None:
                items.append((category, i, image))

    for category, i, image in pick(items, limit, seed, key=lambda it: f"{it[0]}/{it[2].name}"):
        english = _usable(_entry(lists.get("en", {}), category, i) or base[f"a4a_{category}"][i])
        if english is None:
            plan.skipped["art4apps_no_word"] += 1
            continue
        label = english.lower()
        rel = plan.add_file(image, f"media/art4apps/{category}/{image.name}")
        common = {"label": label, "category": f"art4apps/{category}", "source": NAME}
        common["split"] = split_for(label)
        base_id = f"art4apps/{category}/{image.stem}"
        plan.rows.append({"id": base_id, "image": rel, "text": english, "lang": "en", **common})
        for lang in languages:
            if lang == "en" or lang not in lists:
                continue
            word = _usable(_entry(lists[lang], category, i))
            if word is None:
                plan.skipped[f"art4apps_no_{lang}"] += 1
                continue
            plan.rows.append({"id": f"{base_id}#{lang}", "image": rel, "text": word, "lang": lang, **common})
    return plan


def _entry(lists: dict[str, list[str]], category: str, i: int) -> str:
    values = lists.get(f"a4a_{category}", [])
    return values[i] if i < len(values) else ""
