"""Benchmarks find the corpus `make demo` builds and keep their caches inside the project."""

from __future__ import annotations

import ast
from pathlib import Path

from benchmarks import paths

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_default_manifest_is_the_demo_corpus() -> None:
    manifest = paths.default_manifest(build=False)
    assert manifest == paths.ROOT / "demo" / "corpus" / "manifest.jsonl"


def test_cache_dir_is_inside_the_project(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(paths, "CACHE", tmp_path / "cache")
    d = paths.cache_dir("lm")
    assert d.is_dir() and d.parent == tmp_path / "cache"


def test_no_benchmark_reads_or_writes_tmp_by_default() -> None:
    """A string constant naming /tmp (the old default corpus and caches) in any benchmark is a regression."""
    offenders = []
    for script in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and value.startswith("/tmp"):
                offenders.append(f"{script.name}:{node.lineno} {value}")
    assert not offenders, offenders
