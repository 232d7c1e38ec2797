"""Model names the API knows: the configured base models, and each project's fine-tuned models and
checkpoints, named as OpenAI names them:

    ft:{base}:{project}:{suffix}:{id}                    the job's final model (`fine_tuned_model`)
    ft:{base}:{project}:{suffix}:{id}:ckpt-step-{N}      a checkpoint (with an id of its own)

A checkpoint is named once, when the scheduler first sees it, and keeps that name: the event that
announces it, the job's checkpoint list and this lookup agree. As on OpenAI, the run's last step is not
announced as a checkpoint: its weights are the final model. A name whose checkpoint was rotated off disk
(a run keeps its newest few) or deleted answers 404 saying so, and names the job's checkpoints that exist.

`current` names the project's current model, the one promoted last (POST /tunery/v1/projects/current_model):
an application that asks for `current` is served each promoted model in turn, without a change of its
own. Wherever a name is kept (a job's model, a queue's, a stored completion's, the answer's `model`), the
model's own name is kept, never `current`.

A name resolves to what the inference worker loads: a local base model and, for fine-tuned models, the
adapter directory (and the adapter it was trained on top of, for checkpoints of continued training).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunery.server.auth import Caller
from tunery.server.errors import APIError, bad_request, model_not_found
from tunery.server.feedback_store import ProjectModel
from tunery.server.schemas import model_object
from tunery.server.settings import Settings
from tunery.server.store import Checkpoint, Job


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    kind: str  # base | fine-tuned | checkpoint
    base: str  # the API name of the base model
    local_model: str  # what `load_for_inference` takes
    adapter: str | None = None  # adapter directory
    base_adapter: str | None = None  # merged in before `adapter` (checkpoints of continued training)
    job_id: str | None = None
    checkpoint_id: str | None = None


def fine_tuned_name(base: str, project: str, suffix: str | None, key: str) -> str:
    return f"ft:{base}:{project}:{suffix or ''}:{key}"


def checkpoint_name(base: str, project: str, suffix: str | None, key: str, step: int) -> str:
    return f"{fine_tuned_name(base, project, suffix, key)}:ckpt-step-{step}"


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


CURRENT = "current"


def current_model(session: Session, project_id: str) -> str | None:
    """The model the project serves as its current one (routes/comparisons.py promotes it), if any."""
    row = session.get(ProjectModel, project_id)
    return row.current_model if row is not None else None


def canonical(session: Session, caller: Caller, name: str, param: str = "model") -> str:
    """`name`, or for `current` the name of the project's current model (a 404 when none was promoted)."""
    if name != CURRENT:
        return name
    current = current_model(session, caller.project_id)
    if current is None:
        raise APIError(
            404,
            "The project has no current model yet: `current` names the model promoted last. Promote one with "
            'POST /tunery/v1/projects/current_model {"model": ...}, or name a model.',
            param,
            "model_not_found",
        )
    return current


def resolve(session: Session, settings: Settings, caller: Caller, name: str) -> ResolvedModel:
    """The model `name` as the caller sees it, or a 404 (another project's model does not exist).
    `current` resolves to the project's current model, under that model's own name."""
    name = canonical(session, caller, name)
    if name in settings.base_models:
        return ResolvedModel(name, "base", name, settings.base_models[name])
    if not name.startswith("ft:"):
        raise model_not_found(name)
    job = session.scalar(
        select(Job).where(
            Job.fine_tuned_model == name,
            Job.project_id == caller.project_id,
            Job.model_deleted.is_(False),
            Job.status == "succeeded",
        )
    )
    if job is not None:
        adapter = job_dir(settings, job.id) / "run" / "final"
        return ResolvedModel(name, "fine-tuned", job.base_model, job.local_model, str(adapter), job_id=job.id)
    ckpt = session.scalar(
        select(Checkpoint)
        .where(Checkpoint.name == name, Checkpoint.project_id == caller.project_id)
        .order_by(Checkpoint.deleted)  # a live one first
    )
    if ckpt is None:
        raise model_not_found(name)
    owner = session.get(Job, ckpt.job_id)
    assert owner is not None
    path = job_dir(settings, owner.id) / ckpt.path
    # the recipe rotates old checkpoints off disk; the scheduler marks them deleted at its next look
    if ckpt.deleted or (ckpt.path.startswith("run/checkpoints/") and not path.is_dir()):
        raise checkpoint_removed(session, ckpt)
    is_final = ckpt.path == "run/final"
    return ResolvedModel(
        name,
        "checkpoint",
        owner.base_model,
        owner.local_model,
        str(path),
        None if is_final else owner.parent_adapter,
        job_id=owner.id,
        checkpoint_id=ckpt.id,
    )


def refuse_reward_model(session: Session, model: ResolvedModel, param: str = "model") -> None:
    """A reward model scores answers; it cannot write them (chat completions, answers for a queue), nor
    be the start of a job that trains a model to write them."""
    if model.job_id is None:
        return
    job = session.get(Job, model.job_id)
    if job is not None and job.method.get("type") == "reward_model":
        raise bad_request(
            f"The model '{model.name}' is a reward model: it scores answers and cannot write them. "
            "Chat with the model it was trained next to, or use it with `tunery score --rm`.",
            param,
            "model_not_chat",
        )


def checkpoint_removed(session: Session, ckpt: Checkpoint) -> APIError:
    """The 404 for a name that was a checkpoint (or the model) of one of the caller's jobs: it says so, and
    names the job's checkpoints that can still be used, rather than that the model never existed."""
    if ckpt.path == "run/final":
        gone = f"The model '{ckpt.name}' of job {ckpt.job_id} has been deleted."
    else:
        gone = (
            f"The checkpoint '{ckpt.name}' (step {ckpt.step_number} of job {ckpt.job_id}) has been removed: "
            "deleted, or rotated off disk (a job keeps its final model and its newest checkpoints only)."
        )
    live = session.scalars(
        select(Checkpoint)
        .where(Checkpoint.job_id == ckpt.job_id, Checkpoint.deleted.is_(False), Checkpoint.id != ckpt.id)
        .order_by(Checkpoint.step_number.desc(), Checkpoint.created_at.desc())
    ).all()
    if live:
        names = ", ".join(f"{c.name} (step {c.step_number})" for c in live)
        message = f"{gone} The checkpoints of job {ckpt.job_id} that exist: {names}."
    else:
        message = f"{gone} No checkpoint of job {ckpt.job_id} exists any more."
    return APIError(404, message, "model", "model_not_found")


def list_models(
    session: Session, settings: Settings, caller: Caller, base_created: int
) -> list[dict[str, Any]]:
    models = [model_object(name, base_created, "system") for name in settings.base_models]
    jobs = session.scalars(
        select(Job)
        .where(Job.project_id == caller.project_id, Job.status == "succeeded", Job.model_deleted.is_(False))
        .order_by(Job.seq)
    ).all()
    for job in jobs:
        if job.fine_tuned_model:
            models.append(
                model_object(job.fine_tuned_model, job.finished_at or job.created_at, caller.project_name)
            )
    ckpts = session.scalars(
        select(Checkpoint)
        .where(Checkpoint.project_id == caller.project_id, Checkpoint.deleted.is_(False))
        .order_by(Checkpoint.created_at, Checkpoint.step_number)
    ).all()
    listed = {m["id"] for m in models}
    for ckpt in ckpts:
        if ckpt.name not in listed:  # the final checkpoint is the fine-tuned model itself
            models.append(model_object(ckpt.name, ckpt.created_at, caller.project_name))
    return models
