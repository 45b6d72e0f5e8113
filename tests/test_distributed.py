"""Ray is optional (``mm[ray]``): nothing imports it unless asked, and asking without it gives the install
hint as a one-line CLI error. (The Ray tests themselves are in ``tests/ray/``.)"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import service.distributed


def test_importing_mm_index_service_and_the_cli_does_not_import_ray():
    modules = ["mm", "mm.model", "index", "index.sharded", "index.ingest", "service", "service.app"]
    modules += ["service.cli", "service.cli.index", "service.cli.serve", "service.distributed"]
    modules += [f"service.distributed.{m.name}" for m in pkgutil.iter_modules(service.distributed.__path__)]
    code = (
        f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))"
    )
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert "service.distributed.ingest" in modules  # the Ray modules themselves are among those imported


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError


def test_without_ray_the_cli_says_how_to_install_it(no_ray, media_root, tmp_path, capsys):
    from service.cli import main

    argv = ["index", str(media_root), "--collection", str(tmp_path / "c")]
    code = main([*argv, "--ray", "local", "--shards", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "mm: error: Ray is not installed: pip install 'mm[ray]'"
    assert not (tmp_path / "c").exists()  # refused before anything was made


def test_ray_options_are_checked_before_anything_starts(media_root, tmp_path, capsys):
    from service.cli import main

    coll = str(tmp_path / "c")
    assert main(["index", str(media_root), "--collection", coll, "--ray", "local"]) == 2
    assert "give --shards S" in capsys.readouterr().err
    assert main(["index", "--collection", coll, "--ray", "local", "--shards", "2"]) == 2
    assert "--manifest FILE" in capsys.readouterr().err
    assert main(["index", "--collection", coll, "--manifest", str(media_root)]) == 2
    assert "give --ray ADDRESS" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_manifest_lines(tmp_path):
    from service.distributed.ingest import read_manifest

    (tmp_path / "a.txt").write_text("hello")
    m = tmp_path / "m.jsonl"
    m.write_text('{"uri": "a.txt"}\n\n{"path": "' + str(tmp_path / "a.txt") + '"}\n{"uri": "gone.png"}\n')
    files, errors = read_manifest(m)
    assert files == [tmp_path / "a.txt", tmp_path / "a.txt"]
    assert [(e.path, e.error) for e in errors] == [(str(tmp_path / "gone.png"), "no such file")]
    m.write_text('["a.txt"]\n')
    with pytest.raises(ValueError, match=r"m.jsonl:1: want an object"):
        read_manifest(m)


def test_parquet_manifest(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from service.distributed.ingest import read_manifest

    (tmp_path / "a.txt").write_text("hello")
    pq.write_table(pa.table({"uri": ["a.txt", "gone.png"], "size": [5, 0]}), tmp_path / "m.parquet")
    files, errors = read_manifest(tmp_path / "m.parquet")
    assert files == [tmp_path / "a.txt"] and [e.path for e in errors] == [str(tmp_path / "gone.png")]
    pq.write_table(pa.table({"name": ["a.txt"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r'want a "uri" \(or "path"\) column'):
        read_manifest(tmp_path / "bad.parquet")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a Parquet file"):
        read_manifest(tmp_path / "fake.parquet")


@pytest.mark.parametrize(
    ("address", "says"),
    [("127.0.0.1:1", "cannot reach a Ray cluster at '127.0.0.1:1'"), ("nohost", "bad Ray address 'nohost'")],
)
def test_an_unreachable_or_malformed_address_is_a_one_line_error(address, says, media_root, tmp_path, capsys):
    pytest.importorskip("ray")
    from service.cli import main

    argv = ["index", str(media_root), "--collection", str(tmp_path / "c"), "--model", "tiny"]
    assert main([*argv, "--ray", address, "--shards", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mm: error: {says}") and "\n" not in err
    assert not (tmp_path / "c").exists()
