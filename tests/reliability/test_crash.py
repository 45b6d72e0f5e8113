"""``kill -9`` of ``mm index`` at seeded random points, creation included, and of ``mm serve`` while it
creates its collection and under concurrent uploads, text items and deletes; then the invariants
(crash.py).

CI runs a bounded number of kills; ``python benchmarks/bench_crash.py --kills 100`` is the full run.
"""

from __future__ import annotations

import sqlite3

import pytest
from crash import CrashRun, ServeCrashRun, run_kills, write_round

KILLS = 10
SERVE_KILLS = 3
SEED = 18


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_kill_9_of_mm_index_breaks_nothing(tmp_path):
    kills = run_kills(tmp_path, kills=KILLS, seed=SEED, fresh_every=5)
    assert sum("appears" in k.trigger for k in kills) >= 2, "no kill landed on collection creation"
    assert sum(k.killed for k in kills) >= KILLS // 2, [k.trigger for k in kills]  # mid-run, not after it
    broken = [k for k in kills if k.problems]
    assert not broken, "\n".join(f"round {k.round} killed {k.trigger}: {k.problems}" for k in broken)


@pytest.mark.slow
def test_the_checks_see_a_lost_write_and_a_leftover(tmp_path):
    """The invariants can fail: an acknowledged row deleted (open then repairs FAISS from SQLite, so the
    loss shows only against the acknowledged set), and a temp file that open does not clean."""
    run = CrashRun(tmp_path, seed=1)
    folder = tmp_path / "src" / "round_0"
    write_round(folder, seed=1, images=4)
    out = run.run_to_end(folder)
    assert out["added"] == len(run.acked) == 8 and run.check() == []
    db = sqlite3.connect(run.coll / "meta.sqlite")
    with db:
        db.execute("DELETE FROM items WHERE id = (SELECT min(id) FROM items)")
    db.close()
    (run.coll / "stray.tmp").write_bytes(b"x")
    problems = " | ".join(run.check())
    assert "1 acknowledged files lost" in problems and "leftovers" in problems, problems


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_of_mm_serve_loses_no_acknowledged_write_and_brings_back_no_delete(tmp_path):
    run = ServeCrashRun(tmp_path, seed=SEED)
    creation = run.kill_at_creation()  # the first start creates the collection
    assert creation.killed, f"mm serve was not killed while creating its collection ({creation.trigger})"
    kills = [creation] + [run.kill_once() for _ in range(SERVE_KILLS)]
    assert run.acks and run.deleted, "the traffic acknowledged nothing: the kills tested nothing"
    assert run.acked, "no acknowledged item outlived the deletes: the restarts read nothing back"
    broken = [k for k in kills if k.problems]
    assert not broken, "\n".join(f"round {k.round} killed {k.trigger}: {k.problems}" for k in broken)
