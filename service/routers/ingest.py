"""``POST /ingest`` (a server-side file or folder, as a background job) and ``GET /jobs``/``/jobs/{id}``.

Only paths under ``MM_ALLOWED_ROOTS`` are accepted, after resolving symlinks and ``..`` (403 otherwise;
403 as well when no roots are configured); inside a folder, every file and symlink target is checked
the same way, and one leading outside is refused in the job's per-item errors. Jobs run one at a time
in a worker thread.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import CollectionDep, EmbedderDep, JobsDep, SettingsDep
from service.errors import APIError
from service.jobs import Job
from service.schemas import IngestRequest, JobOut, error_responses
from service.store import resolve_allowed

router = APIRouter(tags=["ingest"])


@router.post("/ingest", response_model=JobOut, status_code=202, responses=error_responses(401, 403, 404, 422))
def start_ingest(
    req: IngestRequest, collection: CollectionDep, embedder: EmbedderDep, settings: SettingsDep, jobs: JobsDep
) -> JobOut:
    """Index a server-side file or folder in the background; poll ``GET /jobs/{id}`` for progress."""
    try:
        path = resolve_allowed(req.path, settings.allowed_roots)
    except PermissionError as exc:
        raise APIError(403, str(exc)) from exc
    except FileNotFoundError as exc:
        raise APIError(404, str(exc)) from exc
    except (ValueError, OSError, RuntimeError) as exc:  # a name too long; a symlink loop (RuntimeError)
        raise APIError(422, f"cannot use {req.path!r}: {exc}", "validation_error") from exc

    def run(job: Job):
        from index.api import ingest_into

        report = ingest_into(
            collection,
            embedder,
            [path],
            batch_size=settings.batch_size,
            workers=settings.ingest_workers,
            progress=False,
            tags=req.tags or None,
            on_progress=job.progress,
            should_stop=job.stop.is_set,
            allowed_roots=settings.allowed_roots,  # a symlink in a root must not lead out of them
            transcribe=getattr(embedder, "transcribe", None),  # speech keeps its transcript
        )
        collection.save()
        return report

    job = jobs.submit("ingest", {"path": str(path), "tags": req.tags}, run)
    return JobOut.model_validate(job.to_dict())


@router.get("/jobs", response_model=list[JobOut], responses=error_responses(401))
def list_jobs(jobs: JobsDep) -> list[JobOut]:
    return [JobOut.model_validate(j.to_dict()) for j in jobs.list()]


@router.get("/jobs/{job_id}", response_model=JobOut, responses=error_responses(401, 404))
def get_job(job_id: str, jobs: JobsDep) -> JobOut:
    job = jobs.get(job_id)
    if job is None:
        raise APIError(404, f"job {job_id} not found")
    return JobOut.model_validate(job.to_dict())


@router.delete("/jobs/{job_id}", response_model=JobOut, responses=error_responses(401, 404))
def cancel_job(job_id: str, jobs: JobsDep) -> JobOut:
    """Ask a queued or running job to stop after the current batch."""
    job = jobs.cancel(job_id)
    if job is None:
        raise APIError(404, f"job {job_id} not found")
    return JobOut.model_validate(job.to_dict())
