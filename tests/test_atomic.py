"""Crash-safe writes: one helper per layer (mm/atomic.py, index/atomic.py), one code, used by every writer.

A temp-file-then-rename without fsync can leave an empty or torn file after a power cut even though the
rename itself happened; every file the project writes goes through ``atomic_write`` (or, for an upload
named after its content, ``durable_replace``), which fsyncs the data and the directory.
"""

from __future__ import annotations

import ast
import inspect
import io
import os
from pathlib import Path

import numpy as np
import pytest

import index.atomic
import mm.atomic

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("fsync_dir", "durable_replace", "atomic_write", "atomic_write_bytes")
HELPERS = {Path("mm/atomic.py"), Path("index/atomic.py")}


def test_the_two_copies_are_the_same_code():
    """The layer rule keeps two copies (mm may not import index, nor index mm); they may not drift."""
    for name in SHARED:
        a = ast.dump(ast.parse(inspect.getsource(getattr(mm.atomic, name))))
        b = ast.dump(ast.parse(inspect.getsource(getattr(index.atomic, name))))
        assert a == b, f"mm/atomic.py and index/atomic.py disagree on {name}: change both"


def _renames(tree: ast.AST) -> list[int]:
    """Lines of ``os.replace/os.rename(...)`` and of ``x.replace(target)`` / ``x.rename(target)`` calls
    (one positional argument, no keywords: ``Path.replace``; ``str.replace`` takes two and
    ``dataclasses.replace`` takes keywords)."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in ("replace", "rename"):
            continue
        owner = node.func.value
        if (
            isinstance(owner, ast.Name)
            and owner.id == "os"
            or (
                len(node.args) == 1
                and not node.keywords
                and not isinstance(owner, ast.Constant)
                and not (isinstance(owner, ast.Name) and owner.id == "dataclasses")
            )
        ):
            lines.append(node.lineno)
    return lines


def test_no_hand_written_temp_then_rename_outside_the_helpers():
    found = []
    for pkg in ("mm", "index", "service", "benchmarks"):  # benchmarks write caches too
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT)
            if rel in HELPERS:
                continue
            found += [f"{rel}:{n}" for n in _renames(ast.parse(f.read_text(), str(f)))]
    assert not found, "renames that skip the fsync of mm/atomic.py or index/atomic.py:\n" + "\n".join(found)


def test_the_scan_sees_the_forms_it_forbids():
    code = "import os, dataclasses\nos.replace(a, b)\np.replace(q)\ntmp.rename(t)\n"
    code += "s.replace('a', 'b')\ndataclasses.replace(x, y=1)\nd.replace(tzinfo=z)\n"
    assert _renames(ast.parse(code)) == [2, 3, 4]


@pytest.fixture
def synced(monkeypatch):
    """The files written durably while the test runs: renamed into place after an fsync of their data,
    with an fsync of their directory after the rename (by either helper: both call ``os``)."""
    events: list[tuple[str, Path, Path | None]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")), None))
        real_fsync(fd)

    def replace(src, dst) -> None:
        real_replace(src, dst)
        events.append(("replace", Path(src), Path(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def durable() -> set[Path]:
        out = set()
        for i, (kind, src, dst) in enumerate(events):
            if kind == "replace" and dst is not None:
                data = ("fsync", src, None) in events[:i]
                folder = ("fsync", dst.parent, None) in events[i + 1 :]
                if data and folder:
                    out.add(dst)
        return out

    return durable


def test_helper_fsyncs_file_and_directory_and_leaves_no_temp(tmp_path, synced):
    target = tmp_path / "f.bin"
    mm.atomic.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and synced() == {target}
    with pytest.raises(RuntimeError):
        mm.atomic.atomic_write(target, lambda tmp: (tmp.write_bytes(b"torn"), _fail()))
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def _fail():
    raise RuntimeError("killed mid-write")


def test_model_and_lm_checkpoints_are_fsynced(tmp_path, synced):
    import torch

    from mm.lm import GroundedLM, resolve_lm, save_lm
    from mm.model import create_model, save_model

    out = save_model(create_model("tiny", pretrained=False).model, tmp_path / "model")
    assert {out / "model.safetensors", out / "config.json"} <= synced()
    torch.manual_seed(0)
    lm_out = save_lm(GroundedLM(resolve_lm("lm_tiny")[0]), tmp_path / "lm")
    assert {lm_out / "model.safetensors", lm_out / "config.json"} <= synced()


def test_adapter_files_are_fsynced(tmp_path, synced):
    from mm.adapter import save_adapter
    from mm.lora import LoraSpec, apply_lora
    from mm.model import create_model

    model = create_model("tiny", pretrained=False).model
    spec = LoraSpec(r=2)
    apply_lora(model, spec)
    out = save_adapter(model, spec, tmp_path, base_model="tiny", base_model_id="tiny:0")
    assert {out / "adapter.safetensors", out / "adapter.json"} <= synced()


def test_service_writers_are_fsynced(tmp_path, synced):
    from PIL import Image

    from index.types import Item
    from service.samples import _copy, _write_atomic
    from service.store import save_upload, thumbnail

    _write_atomic(tmp_path / "manifest.jsonl", "{}\n")
    (tmp_path / "src.bin").write_bytes(b"x" * 10)
    _copy(tmp_path / "src.bin", tmp_path / "copy.bin")
    path, created = save_upload(io.BytesIO(b"upload"), tmp_path / "media", ".txt", 100)
    img = tmp_path / "i.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(img)
    item = Item(id=7, modality="image", uri=str(img), sha256="ab" * 32)
    thumb = thumbnail(item, tmp_path / "thumbs", size=4)
    assert created and {tmp_path / "manifest.jsonl", tmp_path / "copy.bin", path, thumb} <= synced()


def test_export_is_fsynced(tmp_path, synced):
    from index.collection import Collection
    from index.types import Item
    from service.cli import main

    with Collection.create(tmp_path / "c", dim=4, embedder_id="fake:1") as c:
        c.add(
            np.eye(4, dtype=np.float32)[:2],
            [Item(id=0, modality="text", uri=f"t{i}", sha256=str(i)) for i in range(2)],
        )
    out = tmp_path / "vectors.npz"
    assert main(["export", "--collection", str(tmp_path / "c"), "--out", str(out)]) == 0
    assert out in synced() and np.load(out)["ids"].tolist() == [1, 2]
