"""Fine-tuning jobs: create, list, retrieve, cancel, pause, resume; their events and checkpoints."""

from __future__ import annotations

import json
import secrets
from typing import Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tunery.server import graders
from tunery.server.auth import Caller
from tunery.server.catalog import job_dir, resolve
from tunery.server.deps import AppState, Auth, State
from tunery.server.errors import APIError, bad_request, not_found
from tunery.server.jobs import add_event, link_or_copy
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
)
from tunery.server.store import Checkpoint, Event, File, Job, new_id, now

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


def _training_file(session: Session, caller: Caller, file_id: str | None, param: str) -> File | None:
    if file_id is None:
        return None
    row = session.get(File, file_id)
    if row is None or row.project_id != caller.project_id:
        raise bad_request(f"invalid {param}: no such file '{file_id}'", param, "file_not_found")
    if row.purpose != "fine-tune":
        raise bad_request(
            f"File {file_id} has purpose '{row.purpose}'; fine-tuning needs purpose 'fine-tune'.",
            param,
            "invalid_file_purpose",
        )
    return row


@router.post("/fine_tuning/jobs")
def create_job(body: JobCreate, state: State, caller: Auth) -> dict[str, Any]:
    settings = state.settings
    method = body.method or Method(type="supervised")
    kind = method.type
    hyperparameters = _hyperparameters(body, method)
    method_body: dict[str, Any] = {"hyperparameters": hyperparameters}
    grader: dict[str, Any] | None = None
    if kind == "reinforcement":
        if method.reinforcement is None:
            raise bad_request(
                "Missing required parameter: 'method.reinforcement.grader'.",
                "method.reinforcement.grader",
                "missing_required_parameter",
            )
        grader = method.reinforcement.grader
        local_grader = graders.check_for_training(grader, settings)
        extra = method.reinforcement.model_extra or {}
        method_body = {"grader": grader, **extra, "hyperparameters": hyperparameters}
    with state.scheduler.lock, state.store.session() as session:
        session.info["audit_key_id"] = caller.key_id  # the audit log names the key that did it
        if body.model in settings.base_models:
            base, local, parent = body.model, settings.base_models[body.model], None
        else:
            try:
                resolved = resolve(session, settings, caller, body.model)
            except APIError:
                raise bad_request(
                    f"Model {body.model} is not available for fine-tuning or does not exist. Base models: "
                    f"{', '.join(settings.base_models)}, or one of your fine-tuned models.",
                    "model",
                    "model_not_available",
                ) from None
            if resolved.base_adapter is not None:
                raise bad_request(
                    "This checkpoint was itself trained on top of another fine-tuned model; start from that job's final model instead.",
                    "model",
                    "model_not_available",
                )
            base, local, parent = resolved.base, resolved.local_model, resolved.adapter
        training = _training_file(session, caller, body.training_file, "training_file")
        validation = _training_file(session, caller, body.validation_file, "validation_file")
        assert training is not None
        job = Job(
            id=new_id("ftjob-"),
            project_id=caller.project_id,
            seq=int(session.scalar(select(func.max(Job.seq))) or 0) + 1,
            model=body.model,
            base_model=base,
            local_model=local,
            parent_adapter=parent,
            training_file=training.id,
            validation_file=validation.id if validation else None,
            method={"type": kind, kind: method_body},
            hyperparameters={
                k: hyperparameters[k] for k in ("batch_size", "learning_rate_multiplier", "n_epochs")
            },
            suffix=body.suffix,
            seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
            job_metadata=body.metadata,
            integrations=body.integrations,
            status="validating_files",
            model_key=new_id("", 8),
            created_at=now(),
            result_files=[],
        )
        directory = job_dir(settings, job.id)
        link_or_copy(settings.files_dir / training.id, directory / "training.jsonl")
        if validation is not None:
            link_or_copy(settings.files_dir / validation.id, directory / "validation.jsonl")
        if grader is not None:
            (directory / "grader.json").write_text(json.dumps(local_grader, indent=2))
        session.add(job)
        session.flush()
        add_event(session, job.id, f"Created fine-tuning job: {job.id}")
        if body.integrations:
            add_event(
                session, job.id, "Integrations are not available offline and are ignored.", level="warn"
            )
    state.scheduler.wake()
    return job_object(job, caller.project_id)


def _job(session: Session, caller: Caller, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.project_id != caller.project_id:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return job


def _metadata_filter(request: Request) -> tuple[bool, dict[str, str] | None]:
    """(filter on metadata?, required pairs or None for `metadata=null`) from `metadata[k]=v` params."""
    params = request.query_params
    if params.get("metadata") == "null":
        return True, None
    pairs = {
        k[len("metadata[") : -1]: v
        for k, v in params.multi_items()
        if k.startswith("metadata[") and k.endswith("]")
    }
    return bool(pairs), pairs


@router.get("/fine_tuning/jobs")
async def list_jobs(
    request: Request,
    state: State,
    caller: Auth,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
) -> dict[str, Any]:
    filtering, pairs = _metadata_filter(request)

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
