"""Crash safety of ``mm index``: SIGKILL at seeded random points, then the invariants after each kill.

Each kill starts ``mm index`` on a folder of new media and kills it when a file of a collection being
created appears, at the k-th write seen in the collection folder, or after a random delay; then checks
that the collection opens, SQLite's integrity_check is ok, the FAISS ids are the SQLite rows with a
vector, every file of every run that exited 0 is present, no ``*.tmp`` is left, and that a rerun
succeeds. The harness is ``tests/reliability/crash.py`` (the test suite runs 10 kills of it).

``--serve-kills N`` adds one kill of ``mm serve`` while it creates its collection and N kills during
concurrent uploads, text items and deletes: after a restart every acknowledged item is there and no
acknowledged delete came back, and with the server stopped the collection checks clean and holds no
upload without an item.

Usage: ``python benchmarks/bench_crash.py [--kills 100] [--serve-kills 10] [--seed 0] [--fresh-every 10]
[--work DIR]``; the last line is JSON: kills, those that landed mid-run and on creation, failures, files
acknowledged and lost, and the same for the serve kills.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "reliability"))

log = logging.getLogger("bench_crash")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--serve-kills", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh-every", type=int, default=10, help="a new collection every N kills")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed after)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("index").setLevel(logging.ERROR)  # repairs after kills are expected, not news
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request of the serve checks

    from crash import CrashRun, ServeCrashRun

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-crash-") as tmp:
        work = args.work or Path(tmp)
        kills, runs = [], []
        run: CrashRun | None = None
        for i in range(args.kills):
            if run is None or i % args.fresh_every == 0:
                run = CrashRun(work / f"c{i}", seed=args.seed * 7919 + i)
                runs.append(run)
            kill = run.kill_once(run.random_trigger())
            kills.append(kill)
            log.info("kill %d/%d %s: %s", i + 1, args.kills, kill.trigger, kill.problems or "ok")
        acked = sum(len(r.acked) for r in runs)
        serve = ServeCrashRun(work / "serve", seed=args.seed)
        serve_kills = []
        if args.serve_kills:  # the first start creates the collection: kill it there once
            kill = serve.kill_at_creation()
            serve_kills.append(kill)
            log.info("serve kill at creation %s: %s", kill.trigger, kill.problems or "ok")
        for i in range(args.serve_kills):
            kill = serve.kill_once()
            serve_kills.append(kill)
            log.info("serve kill %d/%d %s: %s", i + 1, args.serve_kills, kill.trigger, kill.problems or "ok")
    failures = [k for k in kills if k.problems]
    serve_failures = [k for k in serve_kills if k.problems]
    print(
        json.dumps(
            {
                "kills": len(kills),
                "landed_mid_run": sum(k.killed for k in kills),
                "on_creation": sum("appears" in k.trigger for k in kills),
                "failures": len(failures),
                "files_acknowledged": acked,
                "files_lost": sum(k.lost for k in kills),
                "seconds": round(time.monotonic() - t0, 1),
                "serve_kills": len(serve_kills),
                "serve_on_creation": sum("appears" in k.trigger and k.killed for k in serve_kills),
                "serve_failures": len(serve_failures),
                "serve_items_acknowledged": serve.acks,
                "serve_deletes_acknowledged": len(serve.deleted),
                "serve_items_lost": sum(k.lost for k in serve_kills),
                "problems": [f"{k.trigger}: {k.problems}" for k in (failures + serve_failures)[:10]],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
