"""Kill ``mm index`` with SIGKILL at seeded random points and check what a crash must never break.

Used by test_crash.py (a few kills) and benchmarks/bench_crash.py (``--kills 100``). Each round writes a
folder of new media, starts ``mm index`` on it in a subprocess and kills it: after a random delay, or the
moment a file of a collection being created appears (``meta.sqlite``, ``collection.json``), or at the
k-th write seen in the collection folder. Then:

- the collection opens (or, killed before anything was acknowledged, does not exist);
- SQLite's ``PRAGMA integrity_check`` says ``ok``;
- the FAISS ids served are exactly the SQLite rows with a vector;
- no acknowledged write is lost: every file of every ``mm index`` run that exited 0 is present;
- no leftovers: no ``*.tmp`` file anywhere in the collection folder;
- a rerun of ``mm index`` on the same folder succeeds (nothing is bricked), and is then acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from live import MM, ROOT, free_port

KEEP_ALIVE = 3  # the deleter leaves this many acknowledged items standing
ROUND_ACKS = KEEP_ALIVE + 3  # writes acknowledged in a round before its kill (at the earliest)
CREATION_FILES = ("meta.sqlite", "collection.json")


@dataclass
class Kill:
    round: int
    trigger: str  # "after 1.23 s", "at write 3" or "when meta.sqlite appears"
    killed: bool  # False: the run had already finished when the kill came
    problems: list[str] = field(default_factory=list)
    lost: int = 0  # acknowledged files missing after the kill


def write_round(folder: Path, seed: int, images: int = 24) -> list[Path]:
    """New distinct media (PNG images, WAV tones, texts) for one round."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(images):
        pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        path = folder / f"img_{seed}_{i}.png"
        Image.fromarray(pixels).resize((64, 48)).save(path)
        paths.append(path)
    for i in range(2):
        t = np.arange(8000) / 16000
        path = folder / f"tone_{seed}_{i}.wav"
        sf.write(path, (0.3 * np.sin(2 * math.pi * rng.uniform(200, 2000) * t)).astype(np.float32), 16000)
        paths.append(path)
        text = folder / f"note_{seed}_{i}.txt"
        text.write_text(f"round {seed} note {i}: " + " ".join(rng.choice(["red", "sea", "owl", "jam"], 6)))
        paths.append(text)
    return paths


class CrashRun:
    """One collection under repeated kills; ``acked`` holds the files of runs that exited 0."""

    def __init__(self, work: Path, seed: int, *, model: str = "tiny", batch_size: int = 4) -> None:
        self.work = work
        self.coll = work / "coll"
        self.rng = random.Random(seed)
        self.seed = seed
        self.model = model
        self.batch_size = batch_size
        self.acked: set[str] = set()
        self.rounds = 0
        self.full_run_s = 8.0  # refined by every run that finishes
        self.last_lost = 0  # acknowledged files missing at the last check

    def command(self, folder: Path) -> list[str]:
        return [
            sys.executable, "-c", MM, "index", str(folder), "--collection", str(self.coll),
            "--model", self.model, "--batch-size", str(self.batch_size), "--json", "--quiet",
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def run_to_end(self, folder: Path) -> dict:
        """``mm index`` to completion; its files become acknowledged."""
        t0 = time.monotonic()
        proc = subprocess.run(
            self.command(folder), env=self._env(), cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"mm index failed after a kill (exit {proc.returncode}): {proc.stderr[-800:]}"
            )
        self.full_run_s = time.monotonic() - t0
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        failed = {e["path"] for e in out["errors"]}
        self.acked |= {str(p.resolve()) for p in folder.iterdir() if str(p.resolve()) not in failed}
        return out

    def kill_once(self, trigger: str | float | int) -> Kill:
        """A new round: start ``mm index``, SIGKILL it at ``trigger``, check, rerun to the end, check."""
        self.rounds += 1
        folder = self.work / "src" / f"round_{self.rounds}"
        write_round(folder, seed=self.seed * 1000 + self.rounds)
        proc = subprocess.Popen(
            self.command(folder),
            env=self._env(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        label = self._wait(proc, trigger)
        killed = proc.poll() is None
        proc.kill()
        proc.wait()
        kill = Kill(self.rounds, label, killed)
        kill.problems += [f"after the kill: {p}" for p in self.check()]
        kill.lost = self.last_lost
        try:
            self.run_to_end(folder)
        except AssertionError as exc:
            kill.problems.append(str(exc))
        else:
            kill.problems += [f"after the rerun: {p}" for p in self.check()]
        return kill

    def random_trigger(self) -> str | float | int:
        """A creation file while the collection does not exist yet; else a random delay within the last
        full run (float seconds) or the k-th write seen in the collection folder (int k)."""
        if not (self.coll / "meta.sqlite").exists():
            return self.rng.choice(CREATION_FILES)
        if self.rng.random() < 0.5:
            return round(self.rng.uniform(0.0, 1.1 * self.full_run_s), 3)
        return self.rng.randint(1, 12)

    def _signature(self) -> tuple:
        """What changes on every write: size and mtime of the SQLite files and the FAISS file."""
        sig = []
        for name in ("meta.sqlite", "meta.sqlite-wal", "vectors.faiss", "collection.json"):
            try:
                st = (self.coll / name).stat()
                sig.append((st.st_size, st.st_mtime_ns))
            except OSError:
                sig.append(None)
        return tuple(sig)

    def _wait(self, proc: subprocess.Popen, trigger: str | float | int) -> str:
        deadline = time.monotonic() + 120
        if isinstance(trigger, str):
            while not (self.coll / trigger).exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            return f"when {trigger} appears"
        if isinstance(trigger, int):
            seen, last = 0, self._signature()
            while seen < trigger and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
                now = self._signature()
                seen, last = seen + (now != last), now
            return f"at write {trigger}"
        with contextlib.suppress(subprocess.TimeoutExpired):  # finished early: the kill comes too late
            proc.wait(timeout=trigger)
        return f"after {trigger:.2f} s"

    def check(self) -> list[str]:
        """The invariants; a list of what is broken (empty when all hold)."""
        from index.collection import Collection

        if not (self.coll / "meta.sqlite").exists() and not self.acked:
            return []  # killed before the collection existed: nothing to keep
        problems = []
        try:
            coll = Collection.open(self.coll)
        except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
            self.last_lost = len(self.acked)
            if self.acked:
                return [f"the collection does not open: {type(exc).__name__}: {exc}"]
            return []  # a half-created collection, cleaned up on open: acceptable before any ack
        try:
            report = coll.check()
            uris = coll.uris_under(str(self.work / "src"))
        finally:
            coll.close()
        db = sqlite3.connect(f"file:{self.coll / 'meta.sqlite'}?mode=ro", uri=True)
        try:
            integrity = [r[0] for r in db.execute("PRAGMA integrity_check")]
            with_vectors = db.execute("SELECT count(*) FROM items WHERE vector IS NOT NULL").fetchone()[0]
        finally:
            db.close()
        if integrity != ["ok"]:
            problems.append(f"integrity_check: {integrity[:3]}")
        if (
            report.get("faiss_live") != with_vectors
            or report.get("missing_in_faiss")
            or report.get("extra_in_faiss")
        ):
            problems.append(
                f"FAISS serves {report.get('faiss_live')} ids, SQLite has {with_vectors} vectors "
                f"(missing {report.get('missing_in_faiss')}, extra {report.get('extra_in_faiss')})"
            )
        lost = self.acked - uris
        self.last_lost = len(lost)
        if lost:
            problems.append(f"{len(lost)} acknowledged files lost, e.g. {sorted(lost)[:2]}")
        leftovers = [str(p) for p in self.coll.rglob("*.tmp")]
        if leftovers:
            problems.append(f"leftovers: {leftovers[:3]}")
        return problems


def run_kills(work: Path, kills: int, seed: int = 0, fresh_every: int = 5) -> list[Kill]:
    """``kills`` kills; every ``fresh_every``-th starts a new collection, to kill creation again."""
    results: list[Kill] = []
    run: CrashRun | None = None
    for i in range(kills):
        if run is None or i % fresh_every == 0:
            run = CrashRun(work / f"c{i}", seed=seed * 7919 + i)
        results.append(run.kill_once(run.random_trigger()))
    return results


# -- mm serve ------------------------------------------------------------------------------------------
def png_bytes(seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((64, 48)).save(buf, format="PNG")
    return buf.getvalue()


class ServeCrashRun:
    """``mm serve`` killed during concurrent uploads, text items and deletes; then restarted and checked.

    ``acked`` maps the id of every item a 201 answered to its sha256; ``deleted`` those a DELETE answered
    200 (removed from ``acked``). A request cut by the kill is neither: its outcome is unknown.
    """

    def __init__(self, work: Path, seed: int, *, model: str = "tiny") -> None:
        self.work = work
        self.coll = work / "coll"
        self.rng = random.Random(seed)
        self.seed = seed
        self.model = model
        self.acked: dict[int, str] = {}
        self.deleted: dict[int, str] = {}
        self.acks = 0  # every 201 ever answered, deleted later or not
        self.rounds = 0
        self.last_lost = 0
        self._lock = threading.Lock()

    def _spawn(self) -> tuple[subprocess.Popen, str]:
        port = free_port()
        cmd = [sys.executable, "-c", MM, "serve", "--collection", str(self.coll), "--model", self.model,
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return proc, f"http://127.0.0.1:{port}"

    def start(self) -> tuple[subprocess.Popen, str]:
        import httpx

        proc, base = self._spawn()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"mm serve exited {proc.returncode}: {proc.stderr.read()[-800:]!r}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    return proc, base
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        proc.kill()
        raise AssertionError("mm serve did not answer /health in 120 s")

    def _traffic(self, base: str, stop, worker: int) -> None:
        import httpx

        n = 0
        with httpx.Client(base_url=base, timeout=30) as http:
            while not stop.is_set():
                n += 1
                try:
                    if worker == 0:  # uploads
                        data = png_bytes(self.seed * 1_000_003 + self.rounds * 10_007 + n)
                        r = http.post("/items", files={"file": (f"u{n}.png", data, "image/png")})
                    elif worker == 1:  # text items
                        r = http.post("/items/text", json={"text": f"note {self.seed} {self.rounds} {n}"})
                    else:  # deletes of acknowledged items
                        with self._lock:
                            ids = sorted(self.acked)  # keep a few alive so the restart has reads to check
                            victim = self.rng.choice(ids) if len(ids) > KEEP_ALIVE else None
                            sha = self.acked.pop(victim) if victim is not None else ""
                        if victim is None:
                            time.sleep(0.01)
                            continue
                        r = None
                        try:
                            r = http.delete(f"/items/{victim}")
                        finally:  # cut by the kill (r is None): deleted or not, unknown; it leaves both sets
                            with self._lock:
                                if r is not None and r.status_code == 200:
                                    self.deleted[victim] = sha
                                elif r is not None:
                                    self.acked[victim] = sha  # not deleted: still owed
                        continue
                except httpx.HTTPError:
                    return  # the server died mid-request: this request's outcome is unknown
                if r.status_code == 201:
                    body = r.json()
                    with self._lock:
                        self.acked[int(body["id"])] = body.get("sha256") or ""
                        self.acks += 1

    def kill_once(self) -> Kill:
        self.rounds += 1
        proc, base = self.start()
        acks_before = self.acks
        stop = threading.Event()
        threads = [
            threading.Thread(target=self._traffic, args=(base, stop, w), daemon=True) for w in range(3)
        ]
        for t in threads:
            t.start()
        delay = round(self.rng.uniform(0.3, 3.0), 3)
        time.sleep(delay)
        # A loaded machine may acknowledge nothing in the delay: then the kill would test nothing (and
        # the deleter, which keeps KEEP_ALIVE items, would delete nothing). Wait for a few acks first.
        deadline = time.monotonic() + 60
        while self.acks < acks_before + ROUND_ACKS and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        killed = proc.poll() is None
        proc.kill()
        proc.wait()
        stop.set()
        for t in threads:
            t.join(60)
        kill = Kill(self.rounds, f"serve after {delay:.2f} s of traffic", killed)
        if self._restart_and_check(kill):
            kill.lost = self.last_lost
        return kill

    def kill_at_creation(self) -> Kill:
        """``mm serve`` on a collection that does not exist yet, killed the moment one of its files
        appears (``meta.sqlite``: before creation's commit point; ``collection.json``: after it); then
        it must start again on that folder, and the collection check clean."""
        self.rounds += 1
        trigger = self.rng.choice(CREATION_FILES)
        proc, _ = self._spawn()
        deadline = time.monotonic() + 120
        while not (self.coll / trigger).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        killed = proc.poll() is None and (self.coll / trigger).exists()
        proc.kill()
        proc.wait()
        kill = Kill(self.rounds, f"serve when {trigger} appears", killed)
        self._restart_and_check(kill)
        return kill

    def _restart_and_check(self, kill: Kill) -> bool:
        """Start ``mm serve`` again on the killed collection and add what the served and on-disk checks
        find to ``kill.problems``; False (the failed restart its one problem) when it does not start."""
        try:
            proc, base = self.start()
        except AssertionError as exc:
            kill.problems.append(f"restart: {exc}")
            return False
        try:
            kill.problems += self._check_served(base)
        finally:
            proc.terminate()
            proc.wait(60)
        kill.problems += self._check_files()
        return True

    def _check_served(self, base: str) -> list[str]:
        import httpx

        problems = []
        lost, back = [], []
        with httpx.Client(base_url=base, timeout=30) as http:
            for item_id, sha in sorted(self.acked.items()):
                r = http.get(f"/items/{item_id}")
                if r.status_code != 200 or (sha and r.json().get("sha256") != sha):
                    lost.append(item_id)
            for item_id, sha in sorted(self.deleted.items()):
                r = http.get(f"/items/{item_id}")
                if r.status_code == 200 and (not sha or r.json().get("sha256") == sha):
                    back.append(item_id)
        self.last_lost = len(lost)
        if lost:
            problems.append(f"{len(lost)} acknowledged items lost, e.g. {lost[:3]}")
        if back:
            problems.append(f"{len(back)} deleted items back, e.g. {back[:3]}")
        return problems

    def _check_files(self) -> list[str]:
        """With the server stopped: integrity, FAISS == SQLite, no temp files, no unreferenced uploads."""
        from index.collection import Collection

        problems = []
        coll = Collection.open(self.coll)
        try:
            report = coll.check()
            media = self.coll / "media"
            referenced = coll.uris_under(str(media.resolve()) + os.sep)
        finally:
            coll.close()
        if not report.get("ok", False):
            problems.append(f"Collection.check: {report.get('problems')}")
        leftovers = [str(p) for p in self.coll.rglob("*.tmp")]
        if leftovers:
            problems.append(f"leftovers: {leftovers[:3]}")
        orphans = [
            p.name
            for p in (media.iterdir() if media.is_dir() else [])
            if p.is_file() and not p.name.startswith(".") and str(p.resolve()) not in referenced
        ]
        if orphans:
            problems.append(f"{len(orphans)} uploads with no item, e.g. {orphans[:3]}")
        return problems
