"""A job's creation, the one way every route makes one (OpenAI's POST /v1/fine_tuning/jobs and the
feedback studio's training from labels and ratings), and the events every part of the service adds."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tunery.server.auth import Caller
from tunery.server.catalog import canonical, job_dir, refuse_reward_model, resolve
from tunery.server.errors import APIError, bad_request, too_many_requests
from tunery.server.jobs.command import TOP_LEVEL
from tunery.server.settings import Settings
from tunery.server.store import Event, File, Job, new_id, now

TERMINAL = ("succeeded", "failed", "cancelled")


def create_job(
    session: Session,
    settings: Settings,
    caller: Caller,
    kind: str,
    model: str,
    training_file: str,
    hyperparameters: dict[str, Any],
    *,
    validation_file: str | None = None,
    method_extra: dict[str, Any] | None = None,
    grader: dict[str, Any] | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    metadata: dict[str, str] | None = None,
    integrations: list[Any] | None = None,
    resources: dict[str, float] | None = None,
) -> Job:
    """A new job, `validating_files`, of any method the scheduler knows: OpenAI's and Tunery's own (kto,
    reward_model). Checked here for every route: the starting model (`starting_point`) and the files (the
    caller's, purpose fine-tune). `hyperparameters` has every one of the method's, `auto` where not given;
    `method_extra` is the rest of the method's object (a reinforcement job's grader as sent) and `grader`
    the grader as the training process runs it (grader.json). The caller holds the scheduler's lock and
    wakes the scheduler once the session has committed."""
    session.info["audit_key_id"] = caller.key_id  # the audit log names the key that did it
    check_queue_quota(session, settings, caller.project_id)
    check_resources(settings, resources or {})
    model = canonical(session, caller, model)  # the job keeps the model's own name, not `current`
    base, local, parent = starting_point(session, settings, caller, model)
    training = _fine_tune_file(session, caller, training_file, "training_file")
    validation: File | None = None
    if validation_file is not None:
        validation = _fine_tune_file(session, caller, validation_file, "validation_file")
    job = Job(
        id=new_id("ftjob-"),
        project_id=caller.project_id,
        seq=int(session.scalar(select(func.max(Job.seq))) or 0) + 1,
        model=model,
        base_model=base,
        local_model=local,
        parent_adapter=parent,
        training_file=training.id,
        validation_file=validation.id if validation else None,
        method={"type": kind, kind: {**(method_extra or {}), "hyperparameters": hyperparameters}},
        hyperparameters={k: hyperparameters[k] for k in TOP_LEVEL},
        suffix=suffix,
        seed=seed if seed is not None else secrets.randbelow(2**31),
        job_metadata=metadata,
        integrations=integrations,
        resources=resources or None,
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
        (directory / "grader.json").write_text(json.dumps(grader, indent=2))
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Created fine-tuning job: {job.id}")
    for integration in integrations or []:
        project = integration["wandb"]["project"]
        add_event(
            session,
            job.id,
            f"Reporting to Weights & Biases project {project}: offline, in the job's run directory "
            "(`wandb sync` uploads it), unless the service has a WANDB_API_KEY",
        )
    return job


WAITING = ("validating_files", "queued")


def check_queue_quota(session: Session, settings: Settings, project_id: str) -> None:
    """OpenAI's 429 when the project has `project_queued_jobs` jobs waiting already (validating or queued):
    one project cannot fill the service's queue. A job that starts frees a place."""
    limit = settings.project_queued_jobs
    if not limit:
        return
    waiting = session.scalar(
        select(func.count()).select_from(Job).where(Job.project_id == project_id, Job.status.in_(WAITING))
    )
    if waiting is not None and waiting >= limit:
        raise too_many_requests(
            f"This project has {waiting} fine-tuning jobs waiting to run, the most the service queues for "
            f"one project ({limit}); wait for one to start, or cancel one."
        )


def check_resources(settings: Settings, resources: dict[str, float]) -> None:
    """A 400 for a `resources` field asking for more than the operator allows a job."""
    limits = {
        "cpus": settings.job_max_cpus,
        "gpus": settings.job_max_gpus,
        "memory_gb": settings.job_max_memory_gb,
    }
    flags = {"cpus": "--job-max-cpus", "gpus": "--job-max-gpus", "memory_gb": "--job-max-memory-gb"}
    for name, value in resources.items():
        if value > limits[name]:
            raise bad_request(
                f"resources.{name} is {value:g}; this service lets a job ask for at most {limits[name]:g} "
                f"(its {flags[name]})",
                f"resources.{name}",
                "invalid_resources",
            )


def starting_point(
    session: Session, settings: Settings, caller: Caller, model: str
) -> tuple[str, str, str | None]:
    """(base model, local model, parent adapter) of a job that starts from `model`, or a 400: a base model,
    or one of the caller's fine-tuned models or checkpoints that is not a reward model (it scores answers;
    a method trains a model that writes them) and was not itself trained on top of another."""
    if model in settings.base_models:
        return model, settings.base_models[model], None
    try:
        resolved = resolve(session, settings, caller, model)
    except APIError:
        raise bad_request(
            f"Model {model} is not available for fine-tuning or does not exist. Base models: "
            f"{', '.join(settings.base_models)}, or one of your fine-tuned models.",
            "model",
            "model_not_available",
        ) from None
    refuse_reward_model(session, resolved)
    if resolved.base_adapter is not None:
        raise bad_request(
            "This checkpoint was itself trained on top of another fine-tuned model; start from that job's "
            "final model instead.",
            "model",
            "model_not_available",
        )
    return resolved.base, resolved.local_model, resolved.adapter


def _fine_tune_file(session: Session, caller: Caller, file_id: str, param: str) -> File:
    row = session.get(File, file_id)
    if row is None or row.project_id != caller.project_id or row.expired:
        raise bad_request(f"invalid {param}: no such file '{file_id}'", param, "file_not_found")
    if row.purpose != "fine-tune":
        raise bad_request(
            f"File {file_id} has purpose '{row.purpose}'; fine-tuning needs purpose 'fine-tune'.",
            param,
            "invalid_file_purpose",
        )
    return row


def link_or_copy(src: Path, dst: Path) -> None:
    """Give a job its own name for an uploaded file (a hard link: no copy of the bytes)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def add_event(
    session: Session,
    job_id: str,
    message: str,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    session.add(
        Event(
            id=new_id("ftevent-"),
            job_id=job_id,
            created_at=now(),
            level=level,
            message=message,
            type=type,
            data=data,
        )
    )


def next_queue_seq(session: Session) -> int:
    return int(session.scalar(select(func.max(Job.queue_seq))) or 0) + 1
