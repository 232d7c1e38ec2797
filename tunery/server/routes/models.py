"""Models: the base models, and the caller's fine-tuned models and checkpoints; delete a fine-tuned one."""

from __future__ import annotations

import shutil
from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from tunery.server.catalog import CURRENT, job_dir, list_models, resolve
from tunery.server.deps import Auth, State
from tunery.server.errors import APIError, bad_request
from tunery.server.jobs import TERMINAL
from tunery.server.schemas import model_object
from tunery.server.store import Checkpoint, Job

router = APIRouter()


@router.get("/models")
def models(state: State, caller: Auth) -> dict[str, Any]:
    with state.store.session() as session:
        return {"object": "list", "data": list_models(session, state.settings, caller, state.started_at)}


@router.get("/models/{model_id:path}")
def retrieve_model(state: State, caller: Auth, model_id: str) -> dict[str, Any]:
    with state.store.session() as session:
        model = resolve(session, state.settings, caller, model_id)  # `current`: the model it names
        if model.kind == "base":
            return model_object(model.name, state.started_at, "system")
        if model.checkpoint_id is not None:
            ckpt = session.get(Checkpoint, model.checkpoint_id)
            assert ckpt is not None
            return model_object(model.name, ckpt.created_at, caller.project_name)
        job = session.get(Job, model.job_id)
        assert job is not None
        return model_object(model.name, job.finished_at or job.created_at, caller.project_name)


@router.delete("/models/{model_id:path}")
def delete_model(state: State, caller: Auth, model_id: str) -> dict[str, Any]:
    if model_id == CURRENT:  # the model serving the project: deleted only by its own name
        raise bad_request(
            "`current` stands for the project's current model; to delete it, name it (GET /v1/models/current).",
            "model",
            "invalid_value",
        )
    with state.scheduler.lock, state.store.session() as session:
        model = resolve(session, state.settings, caller, model_id)
        if model.kind == "base":
            raise APIError(
                403,
                f"The base model '{model_id}' cannot be deleted; only fine-tuned models can.",
                "model",
                "model_not_deletable",
            )
        job = session.get(Job, model.job_id)
        assert job is not None
        if model.kind == "fine-tuned":
            job.model_deleted = True
            for ckpt in session.scalars(
                select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.path == "run/final")
            ):
                ckpt.deleted = True
            removed = job_dir(state.settings, job.id) / "run" / "final"
        else:
            row = session.get(Checkpoint, model.checkpoint_id)
            assert row is not None
            row.deleted = True
            removed = job_dir(state.settings, job.id) / row.path
            if row.path == "run/final":
                job.model_deleted = True
        # a paused or queued job resumes from its checkpoints: their files stay until it has finished
        if job.status in TERMINAL:
            shutil.rmtree(removed.parent if removed.name == "model" else removed, ignore_errors=True)
    if state.audit is not None:
        deleted = {"model": model_id, "kind": model.kind, "job_id": job.id}
        state.audit.append(caller.project_name, "model.deleted", deleted, caller.key_id)
    return {"id": model_id, "object": "model", "deleted": True}
