"""Background jobs (server-side ingest) run one at a time in a worker thread: one writer per collection."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from index.types import IngestReport

log = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]


@dataclass
class Job:
    id: str
    kind: str  # "ingest"
    params: dict[str, Any]
    status: JobStatus = "queued"
    done: int = 0  # files processed so far
    total: int = 0  # files found (0 until known)
    report: IngestReport | None = None
    error: str | None = None  # why the whole job failed (per-file errors are in report.errors)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def to_dict(self) -> dict[str, Any]:
        r = self.report
        return {
            "id": self.id,
            "kind": self.kind,
            "params": self.params,
            "status": self.status,
            "done": self.done,
            "total": self.total,
            "added": r.added if r else 0,
            "updated": r.updated if r else 0,
            "skipped": r.skipped if r else 0,
            "failed": r.failed if r else 0,
            "errors": [{"path": e.path, "error": e.error} for e in r.errors] if r else [],
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class JobManager:
    """Queues jobs on one worker thread and remembers the last ``keep`` of them."""

    def __init__(self, keep: int = 200):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mm-job")
        self._jobs: dict[str, Job] = {}
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._keep = keep

    def submit(self, kind: str, params: dict[str, Any], fn: Callable[[Job], IngestReport]) -> Job:
        job = Job(id=uuid.uuid4().hex[:16], kind=kind, params=params)
        with self._lock:
            self._jobs[job.id] = job
            self._forget_old()
            self._futures[job.id] = self._pool.submit(self._run, job, fn)
        return job

    def _run(self, job: Job, fn: Callable[[Job], IngestReport]) -> None:
        if job.stop.is_set():
            job.status, job.finished_at = "cancelled", time.time()
            return
        job.status, job.started_at = "running", time.time()
        try:
            job.report = fn(job)
            if job.report is not None and job.report.seen:
                job.done = max(job.done, job.report.seen)
                job.total = max(job.total, job.report.seen)
            job.status = "cancelled" if job.stop.is_set() else "done"
        except Exception as exc:  # a job reports its failure; it must not kill the worker thread
            log.exception("job %s failed", job.id)
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            job.finished_at = time.time()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.finished_at is not None]
        for job in sorted(finished, key=lambda j: j.created_at)[: max(0, len(self._jobs) - self._keep)]:
            self._jobs.pop(job.id, None)
            self._futures.pop(job.id, None)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)

    def cancel(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is not None:
            job.stop.set()
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job | None:
        fut = self._futures.get(job_id)
        if fut is not None:
            fut.result(timeout=timeout)
        return self._jobs.get(job_id)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Ask running jobs to stop and wait for them (the collection closes after this)."""
        for job in self._jobs.values():
            job.stop.set()
        for fut in list(self._futures.values()):
            with contextlib.suppress(Exception):  # a failure is already recorded on the job
                fut.result(timeout=timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)
