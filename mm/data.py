"""Training manifests: JSON Lines files of paired media, one group per line.

A row names up to three views of one thing (``image``, ``audio``, ``text``) plus optional metadata::

    {"id": "tuxpaint/animals/amphibians/frog", "image": "media/tuxpaint/.../frog.png",
     "audio": "media/tuxpaint/.../frog.ogg", "text": "A frog.", "label": "frog",
     "category": "animals/amphibians", "lang": "en", "source": "tuxpaint", "split": "train"}

Every row needs at least two of the three views. Media paths are relative to the manifest's folder
(or absolute). ``label`` names the concept (rows with equal labels count as relevant to each other in
class-level retrieval); ``split`` is ``train``/``val``/``test`` and, when missing, is derived from the
label (or the id) by :func:`split_for`, so that all rows of one concept land in the same split.
The format is documented for users in ``docs/manifest.md``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

SPLITS: tuple[str, ...] = ("train", "val", "test")
VIEWS: tuple[str, ...] = ("image", "audio", "text")  # in the order used by modality keys
_STR_FIELDS: tuple[str, ...] = ("label", "category", "lang", "source")
KNOWN_KEYS: frozenset[str] = frozenset({"id", "split", "meta", *VIEWS, *_STR_FIELDS})


def split_for(key: str, val_pct: int = 10, test_pct: int = 10) -> str:
    """Deterministic split of a concept key: sha1 bucket 0..99, the top ``test_pct`` buckets are test,
    the ``val_pct`` below them val, the rest train. Same key, same split, on every machine."""
    if not key:
        raise ValueError("split_for needs a non-empty concept key")
    if val_pct < 0 or test_pct < 0 or val_pct + test_pct > 100:
        raise ValueError(f"val_pct={val_pct} and test_pct={test_pct} must be >= 0 and sum to <= 100")
    bucket = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % 100
    if bucket >= 100 - test_pct:
        return "test"
    if bucket >= 100 - test_pct - val_pct:
        return "val"
    return "train"


def modality_key(row: dict[str, Any]) -> str:
    """The views a row holds, joined in a fixed order: ``"image+text"``, ``"audio+text"``, ..."""
    return "+".join(v for v in VIEWS if row.get(v))


def validate_row(
    row: Any, base: Path, where: str = "row", check_files: bool = True, seen_ids: set[str] | None = None
) -> dict[str, Any]:
    """Check one manifest row and return it normalised: every known key present (None when absent),
    media paths absolute, ``split`` filled in. ``where`` names the row in error messages."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - KNOWN_KEYS)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(KNOWN_KEYS)} "
            "(put free-form metadata under 'meta')"
        )
    rid = row.get("id")
    if not isinstance(rid, str) or not rid.strip():
        raise ValueError(f"{where}: 'id' must be a non-empty string")
    if seen_ids is not None:
        if rid in seen_ids:
            raise ValueError(f"{where}: duplicate id {rid!r}; ids must be unique within a manifest")
        seen_ids.add(rid)
    out: dict[str, Any] = {"id": rid}
    for view in ("image", "audio"):
        value = row.get(view)
        if value is None:
            out[view] = None
            continue
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: {view!r} must be a file path string")
        path = Path(value)
        path = path if path.is_absolute() else base / path
        if check_files and not path.is_file():
            raise ValueError(f"{where}: {view} file not found: {path} (paths are relative to the manifest)")
        out[view] = str(path)
    text = row.get("text")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise ValueError(f"{where}: 'text' must be a non-empty string when given")
    out["text"] = text
    present = [v for v in VIEWS if out[v] is not None]
    if len(present) < 2:
        raise ValueError(
            f"{where}: a row needs at least two of image/audio/text to form a pair, got {present or 'none'}"
        )
    for key in _STR_FIELDS:
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        out[key] = value
    split = row.get("split")
    if split is None:
        split = split_for(out["label"] or rid)
    elif split not in SPLITS:
        raise ValueError(f"{where}: 'split' must be one of {list(SPLITS)}, got {split!r}")
    out["split"] = split
    meta = row.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"{where}: 'meta' must be a JSON object")
    out["meta"] = meta or {}
    return out


def read_manifest(path: str | Path, check_files: bool = True) -> list[dict[str, Any]]:
    """Read and validate a JSONL manifest. Blank lines are skipped; a bad row raises ValueError naming
    its line. Returns normalised rows (see :func:`validate_row`) with absolute media paths."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest not found: {path} (build one with `mm samples build DIR`)")
    base = path.resolve().parent
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            rows.append(validate_row(raw, base, where, check_files=check_files, seen_ids=seen))
    if not rows:
        raise ValueError(f"{path}: the manifest has no rows")
    return rows
