"""Fine-tuning jobs: create, list, retrieve, cancel, pause, resume; their events and checkpoints."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from tunery.server import graders, jobs
from tunery.server.auth import Caller
from tunery.server.deps import AppState, Auth, State
from tunery.server.errors import bad_request, not_found
from tunery.server.schemas import (
    DpoHyperparameters,
    JobCreate,
    Method,
    ReinforcementHyperparameters,
    SupervisedHyperparameters,
    checkpoint_object,
    cursor_page,
    event_object,
    job_object,
    metadata_filter,
)
from tunery.server.store import Checkpoint, Event, Job

router = APIRouter()

DEFAULTS = {
    "supervised": SupervisedHyperparameters,
    "dpo": DpoHyperparameters,
    "reinforcement": ReinforcementHyperparameters,
}


def _hyperparameters(body: JobCreate, method: Method) -> dict[str, Any]:
    """Every hyperparameter of the method, `auto` where not given; `method` wins over the deprecated
    top-level `hyperparameters` (both are accepted)."""
    values = DEFAULTS[method.type]().model_dump()
    if body.hyperparameters is not None:
        values.update(body.hyperparameters.model_dump(exclude_unset=True))
    sub = getattr(method, method.type)
    if sub is not None and sub.hyperparameters is not None:
        values.update(sub.hyperparameters.model_dump(exclude_unset=True))
    return values


@router.post("/fine_tuning/jobs")
def create_job(body: JobCreate, state: State, caller: Auth) -> dict[str, Any]:
    method = body.method or Method(type="supervised")
    kind = method.type
    hyperparameters = _hyperparameters(body, method)
    method_extra: dict[str, Any] | None = None
    grader: dict[str, Any] | None = None
    if kind == "reinforcement":
        if method.reinforcement is None:
            raise bad_request(
                "Missing required parameter: 'method.reinforcement.grader'.",
                "method.reinforcement.grader",
                "missing_required_parameter",
            )
        grader = graders.check_for_training(method.reinforcement.grader, state.settings)
        method_extra = {"grader": method.reinforcement.grader, **(method.reinforcement.model_extra or {})}
    with state.scheduler.lock, state.store.session() as session:
        job = jobs.create_job(
            session,
            state.settings,
            caller,
            kind,
            body.model,
            body.training_file,
            hyperparameters,
            validation_file=body.validation_file,
            method_extra=method_extra,
            grader=grader,
            suffix=body.suffix,
            seed=body.seed,
            metadata=body.metadata,
            integrations=[i.model_dump(exclude_none=True) for i in body.integrations]
            if body.integrations
            else None,
            resources=body.resources.model_dump(exclude_none=True) if body.resources else None,
        )
    state.scheduler.wake()
    return job_object(job, caller.project_id)


def _job(session: Session, caller: Caller, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.project_id != caller.project_id:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return job


@router.get("/fine_tuning/jobs")
async def list_jobs(
    request: Request,
    state: State,
    caller: Auth,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
) -> dict[str, Any]:
    filtering, pairs = metadata_filter(request)

    def query(session: Session) -> dict[str, Any]:
        select_jobs = select(Job).where(Job.project_id == caller.project_id)
        if after:
            select_jobs = select_jobs.where(Job.seq < _job(session, caller, after).seq)
        select_jobs = select_jobs.order_by(Job.seq.desc())
        if filtering:
            rows = [
                j
                for j in session.scalars(select_jobs).all()
                if (
                    j.job_metadata is None
                    if pairs is None
                    else all((j.job_metadata or {}).get(k) == v for k, v in pairs.items())
                )
            ]
            rows = rows[: limit + 1]
        else:
            rows = list(session.scalars(select_jobs.limit(limit + 1)).all())
        return cursor_page([job_object(j, caller.project_id) for j in rows[:limit]], len(rows) > limit)

    return await state.store.read(query)


# The polled endpoints (a dashboard asks for the job and its events every second or two) are `async` and
# read through `store.read`: on the event loop for SQLite, in a thread for PostgreSQL.


@router.get("/fine_tuning/jobs/{job_id}")
async def retrieve_job(state: State, caller: Auth, job_id: str) -> dict[str, Any]:
    return await state.store.read(
        lambda session: job_object(_job(session, caller, job_id), caller.project_id)
    )


def _control(state: AppState, caller: Caller, job_id: str, action: str) -> dict[str, Any]:
    with state.scheduler.lock, state.store.session() as session:
        session.info["audit_key_id"] = caller.key_id  # the audit log names the key that did it
        job = _job(session, caller, job_id)
        getattr(state.scheduler, action)(session, job)
        return job_object(job, caller.project_id)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(state: State, caller: Auth, job_id: str) -> dict[str, Any]:
    return _control(state, caller, job_id, "cancel")


@router.post("/fine_tuning/jobs/{job_id}/pause")
def pause_job(state: State, caller: Auth, job_id: str) -> dict[str, Any]:
    return _control(state, caller, job_id, "pause")


@router.post("/fine_tuning/jobs/{job_id}/resume")
def resume_job(state: State, caller: Auth, job_id: str) -> dict[str, Any]:
    return _control(state, caller, job_id, "resume")


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(
    state: State, caller: Auth, job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=1000)
) -> dict[str, Any]:
    def query(session: Session) -> dict[str, Any]:
        owner = session.scalar(select(Job.project_id).where(Job.id == job_id))
        if owner != caller.project_id:
            raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
        columns = (Event.id, Event.created_at, Event.level, Event.message, Event.type, Event.data)
        select_events = select(*columns).where(Event.job_id == job_id)  # plain rows: no ORM objects to build
        if after:
            seq = session.scalar(select(Event.seq).where(Event.id == after, Event.job_id == job_id))
            if seq is None:
                raise not_found("event", after, "after")
            select_events = select_events.where(Event.seq < seq)
        rows = session.execute(select_events.order_by(Event.seq.desc()).limit(limit + 1)).all()
        return cursor_page([event_object(r) for r in rows[:limit]], len(rows) > limit)

    return await state.store.read(query)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(
    state: State, caller: Auth, job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=100)
) -> dict[str, Any]:
    def query(session: Session) -> list[Checkpoint]:
        job = _job(session, caller, job_id)
        return list(
            session.scalars(
                select(Checkpoint)
                .where(Checkpoint.job_id == job.id, Checkpoint.deleted.is_(False))
                .order_by(Checkpoint.step_number.desc())
            ).all()
        )

    rows = await state.store.read(query)
    if after:
        ids = [c.id for c in rows]
        if after not in ids:
            raise not_found("checkpoint", after, "after")
        rows = rows[ids.index(after) + 1 :]
    return cursor_page([checkpoint_object(c) for c in rows[:limit]], len(rows) > limit, with_ids=True)
