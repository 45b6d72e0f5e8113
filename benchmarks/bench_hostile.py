"""Cost of hostile files: time and peak memory per case of the bad-file zoo, through each door.

Every case of ``tests/reliability/zoo.py`` (truncated and corrupt files of each format, bombs, lying
headers, huge sparse files, wrong extensions, NUL text, symlink loops, awkward names) goes through folder
ingest (``index.ingest.ingest`` on a folder holding only it), ``POST /items`` and ``/search/upload``
(in-process), each measured for wall time, traced Python peak (tracemalloc) and peak RSS above the
baseline (sampled every 2 ms: Pillow's and libsndfile's buffers are not traced). A case fails when a bad
file is indexed or answered 2xx, or any door answers 5xx. Target: every refusal in milliseconds and
megabytes, whatever the file claims.

Usage: ``python benchmarks/bench_hostile.py [--model tiny] [--only NAME,...]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "reliability"))

log = logging.getLogger("bench_hostile")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Measure:
    """Wall time, traced peak and sampled RSS peak (above the start) of the ``with`` body."""

    def __enter__(self) -> Measure:
        self.base = rss()
        self.peak_rss = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        tracemalloc.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_rss = max(self.peak_rss, rss())

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, rss())

    def row(self) -> dict:
        mb = 1 << 20
        return {
            "s": round(self.seconds, 4),
            "traced_mb": round(self.traced / mb, 2),
            "rss_mb": round((self.peak_rss - self.base) / mb, 1),
        }


def through_ingest(case, src: Path, work: Path, embedder) -> dict:
    from index.ingest import ingest
    from service.store import open_collection

    folder = work / "one" / case.name.replace("/", "_")[:60]
    folder.mkdir(parents=True)
    target = folder / case.name
    if (src / case.name).is_symlink():
        target.symlink_to(os.readlink(src / case.name))
    else:
        os.link(src / case.name, target)  # a hard link keeps a sparse file sparse
    with open_collection(work / f"coll-{len(list(work.glob('coll-*')))}", embedder, create=True) as coll:
        with Measure() as m:
            report = ingest(coll, embedder, [folder], progress=False, workers=1)
        outcome = "indexed" if report.added else ("error" if report.failed else "skipped silently")
    return {**m.row(), "outcome": outcome}


def through_upload(client, url: str, case, src: Path) -> dict:
    import zoo

    data = (src / case.name).read_bytes()
    with Measure() as m:
        resp = client.post(url, files={"file": (case.name, data, zoo.upload_content_type(case))})
    return {**m.row(), "status": resp.status_code}


def failed(case, row: dict) -> bool:
    if row["ingest"]["outcome"] == ("indexed" if case.bad else "error"):
        return True
    if case.bad and row["ingest"]["outcome"] == "skipped silently":
        return True
    for door in ("items", "search_upload"):
        status = row.get(door, {}).get("status")
        if status is not None and (status >= 500 or (case.bad and status < 400)):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--only", default="", help="comma-separated case names")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("index", "service", "httpx"):  # per-item errors and requests are the point, not news
        logging.getLogger(name).setLevel(logging.ERROR)

    import zoo
    from fastapi.testclient import TestClient

    from mm.model import create_model
    from service.app import create_app
    from service.settings import Settings

    wanted = {n for n in args.only.split(",") if n}
    cases = [c for c in zoo.cases() if not wanted or c.name in wanted]
    embedder = create_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        work = Path(tmp)
        src = work / "zoo"
        zoo.build(src, cases)
        settings = Settings(collection=work / "served", allowed_roots=[src], max_upload_mb=16)
        with TestClient(create_app(settings, embedder=embedder)) as client:
            for case in cases:
                row = {"case": case.name, "why": case.why, "expect": case.expect}
                row["ingest"] = through_ingest(case, src, work, embedder)
                if case.uploadable:
                    row["items"] = through_upload(client, "/items", case, src)
                    row["search_upload"] = through_upload(client, "/search/upload", case, src)
                row["failed"] = failed(case, row)
                rows.append(row)
                log.info(
                    "%-28s %-8s ingest %s  items %s  search %s%s",
                    case.name[:28], case.expect, row["ingest"], row.get("items"), row.get("search_upload"),
                    "  FAILED" if row["failed"] else "",
                )  # fmt: skip
    worst = max(rows, key=lambda r: r["ingest"]["rss_mb"])
    print(
        json.dumps(
            {
                "files_tried": len(rows),
                "requests_tried": sum(("items" in r) + ("search_upload" in r) for r in rows),
                "failures": sum(r["failed"] for r in rows),
                "failed_cases": [r["case"] for r in rows if r["failed"]],
                "max_ingest_s": max(r["ingest"]["s"] for r in rows),
                "max_ingest_rss_mb": worst["ingest"]["rss_mb"],
                "max_ingest_rss_case": worst["case"],
                "cases": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
