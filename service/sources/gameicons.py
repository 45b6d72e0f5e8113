"""``gameicons``: the named silhouettes of game-icons.net, from npm ``@iconify-json/game-icons`` (CC-BY-3.0).

`make setup` installs the pinned version into the project's git-ignored ``.npm/`` folder. The package's
``icons.json`` holds every icon as SVG path markup on a 512 x 512 canvas under a kebab-case name
(``"frog": {"body": "<path .../>"}``); each is drawn black on a transparent 256 x 256 PNG by
rsvg-convert. Rows: image + the name as words ("3d-glasses" -> "3d glasses"), which is also the label.
Black silhouettes look unlike every other source, so they stay a source of their own (``gameicons``)
that a training run can leave out to measure what it adds.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from functools import partial
from pathlib import Path

from mm.data import split_for
from service.sources.common import PackageGuard, Plan, RefusedPath, pick, provenance

NAME = "gameicons"
PACKAGE = "@iconify-json/game-icons"
VERSION = "1.2.4"  # pinned in the Makefile (GAMEICONS_VERSION)
LICENCE = "CC-BY-3.0 (game-icons.net, by Lorc, Delapouite and contributors)"
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / ".npm" / "node_modules" / "@iconify-json" / "game-icons"
INSTALL = f"make npm (npm install --prefix .npm {PACKAGE}@{VERSION})"
IMAGE_SIZE = 256
_MAX_JSON_BYTES = 50_000_000
_NAME_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")

logger = logging.getLogger("service.samples")


def label_for(name: str) -> str:
    """``"3d-glasses"`` -> ``"3d glasses"``."""
    return name.replace("-", " ")


def scan(root: Path, limit: int | None = None, seed: int = 0, rsvg: str = "rsvg-convert") -> Plan:
    plan = Plan()
    guard = PackageGuard.for_root(PACKAGE, root, ("package.json", "icons.json"), None)
    package_json = guard.readable(root / "package.json", plan.skipped, NAME)
    meta = json.loads(package_json.read_text(encoding="utf-8")) if package_json else {}
    if meta.get("name") != PACKAGE:  # another npm package (or none) at this path is refused outright
        raise RefusedPath(f"{root}: not the npm package {PACKAGE} (package.json names {meta.get('name')!r})")
    version = str(meta.get("version"))
    if version != VERSION:
        logger.warning("gameicons: %s is version %s, the build pins %s", PACKAGE, version, VERSION)
    plan.provenance = provenance(f"npm:{PACKAGE}", LICENCE, root, guard, version=version)
    plan.provenance["verified_against_package"] = version == VERSION
    icons_json = guard.readable(root / "icons.json", plan.skipped, NAME)
    if icons_json is None:
        return plan
    if icons_json.stat().st_size > _MAX_JSON_BYTES:
        raise ValueError(f"{icons_json}: larger than {_MAX_JSON_BYTES} bytes")
    data = json.loads(icons_json.read_text(encoding="utf-8"))
    width, height = int(data.get("width", 512)), int(data.get("height", 512))
    icons = {
        name: icon
        for name, icon in data.get("icons", {}).items()
        if isinstance(icon, dict) and isinstance(icon.get("body"), str) and not icon.get("hidden")
    }
    plan.skipped["gameicons_hidden"] = len(data.get("icons", {})) - len(icons)
    if shutil.which(rsvg) is None:
        logger.warning("gameicons: %s not found (apt-get install librsvg2-bin): skipping the icons", rsvg)
        plan.skipped["gameicons_no_rsvg"] = len(icons)
        return plan
    for name in pick(sorted(icons), limit, seed, key=lambda n: n):
        if not _NAME_RE.match(name):
            plan.skipped["gameicons_bad_name"] += 1
            continue
        label = label_for(name)
        rel = f"media/gameicons/{name}.png"
        w, h = int(icons[name].get("width", width)), int(icons[name].get("height", height))
        plan.renders[rel] = partial(_render_icon, rsvg, icons[name]["body"], w, h)
        plan.rows.append(
            {
                "id": f"gameicons/{name}",
                "image": rel,
                "text": label,
                "label": label,
                "category": "icon",
                "lang": "en",
                "source": NAME,
                "split": split_for(label),
            }
        )
    return plan


def _render_icon(rsvg: str, body: str, width: int, height: int, dest: Path) -> None:
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" style="color:#000">{body}</svg>'
    )
    cmd = [rsvg, "-w", str(IMAGE_SIZE), "-h", str(IMAGE_SIZE), "-a", "-o", str(dest)]
    proc = subprocess.run(cmd, input=svg.encode("utf-8"), capture_output=True, timeout=60)
    if proc.returncode != 0 or dest.stat().st_size == 0:
        raise ValueError(f"rsvg-convert failed: {proc.stderr.decode(errors='replace')[:200]}")
