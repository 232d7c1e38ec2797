"""What a feedback queue's labels make, under /tunery/v1 (the studio's URLs: routes/feedback.py): a
quality report, an export as a fine-tuning File, and a training job on that File.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from tunery.server.auth import Caller
from tunery.server.catalog import canonical, current_model
from tunery.server.deps import AppState, Auth, State
from tunery.server.errors import bad_request
from tunery.server.feedback import write_file
from tunery.server.feedback_report import EXPORT_RULE, Export, export_lines, held_out_split, quality_report
from tunery.server.feedback_store import FeedbackItem, FeedbackLabel, FeedbackQueue
from tunery.server.jobs import MIN_TRAINING_EXAMPLES, check_queue_quota, create_job, starting_point
from tunery.server.routes.feedback import Body, audit, get_queue, names_of
from tunery.server.schemas import Bounds, DpoHyperparameters, file_object, job_object

router = APIRouter()


class ExportCreate(Body):
    format: Literal["preference", "unpaired"] | None = (
        None  # default: preference (pairwise), unpaired (thumbs)
    )
    min_agreement: Annotated[float, Bounds(ge=0, le=1)] = 0.0
    min_labels: Annotated[int, Bounds(ge=1, le=10)] = 1


class Training(Body):
    """What a job trained on feedback takes besides its data, on every route that starts one."""

    suffix: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    hyperparameters: DpoHyperparameters | None = None
    # prompts held out as the job's validation file (its held-out loss and reward accuracy), drawn with seed
    validation_fraction: Annotated[float, Bounds(ge=0, le=0.5)] = 0.0
    seed: Annotated[int, Bounds(ge=0, le=2**31 - 1)] | None = None  # the split's and the job's


class TrainCreate(ExportCreate, Training):
    method: Literal["dpo", "kto", "reward_model"]
    model: str | None = None  # default: the project's current model, else the queue's model_a


# --- quality and exports -----------------------------------------------------------------------------------


def _queue_data(
    session: Session, caller: Caller, queue_id: str
) -> tuple[FeedbackQueue, list[FeedbackItem], list[FeedbackLabel]]:
    queue = get_queue(session, caller, queue_id)
    items = list(
        session.scalars(
            select(FeedbackItem)
            .where(FeedbackItem.queue_id == queue.id, FeedbackItem.status == "ready")
            .order_by(FeedbackItem.position)
        )
    )
    labels = list(session.scalars(select(FeedbackLabel).where(FeedbackLabel.queue_id == queue.id)))
    return queue, items, labels


@router.get("/feedback/queues/{queue_id}/quality")
def queue_quality(state: State, caller: Auth, queue_id: str) -> dict[str, Any]:
    with state.store.session() as session:
        queue, items, labels = _queue_data(session, caller, queue_id)
        names = names_of(session, caller.project_id)
    return {"queue_id": queue.id} | quality_report(queue.mode, items, labels, names)


def _export(
    session: Session, caller: Caller, queue_id: str, body: ExportCreate, form: str | None
) -> tuple[FeedbackQueue, str, Export]:
    queue, items, labels = _queue_data(session, caller, queue_id)
    form = form or body.format or ("preference" if queue.mode == "pairwise" else "unpaired")
    if queue.mode == "thumbs" and form == "preference":
        raise bad_request(
            "A thumbs queue gives ratings of single answers (unpaired): export format 'unpaired', train KTO.",
            "format",
        )
    found = export_lines(queue.mode, items, labels, form, body.min_agreement, body.min_labels)
    if not found.lines:
        raise bad_request(
            f"Queue {queue.id} has nothing to export yet: {_counts_text(found)}.",
            "queue_id",
            "nothing_to_export",
        )
    return queue, form, found


def _counts_text(found: Export) -> str:
    shown = {k: v for k, v in found.counts.items() if v and k not in ("lines",)}
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in shown.items()) or "no items"


def export_object(row: Any, form: str, found: Export) -> dict[str, Any]:
    return {
        "object": "tunery.feedback_export",
        "format": form,
        "file": file_object(row),
        "counts": dict(found.counts),
        "rule": EXPORT_RULE,
    }


def _file_name(queue: FeedbackQueue, form: str) -> str:
    safe = (
        "".join(c if c.isalnum() or c in "-_" else "-" for c in queue.name.lower()).strip("-")[:60] or "queue"
    )
    return f"feedback-{safe}-{'preferences' if form == 'preference' else 'ratings'}.jsonl"


# An export's parameters all have defaults, so a POST without a body exports with them (a body is needed
# where a parameter is required: errors.py names the missing ones).
@router.post("/feedback/queues/{queue_id}/export")
def export_queue(
    state: State, caller: Auth, queue_id: str, body: ExportCreate | None = None
) -> dict[str, Any]:
    with state.store.session() as session:
        queue, form, found = _export(session, caller, queue_id, body or ExportCreate(), None)
        row = write_file(session, state, caller.project_id, _file_name(queue, form), found.lines)
    audit(
        state,
        caller,
        "feedback.exported",
        {"queue_id": queue.id, "file_id": row.id, "counts": dict(found.counts)},
    )
    return export_object(row, form, found)


# --- training ---------------------------------------------------------------------------------------------


def enough_examples(count: int, what: str) -> None:
    if count < MIN_TRAINING_EXAMPLES:
        raise bad_request(
            f"That makes {count} training examples from {what}; a job needs at least {MIN_TRAINING_EXAMPLES}. "
            "Label more items (or lower min_agreement / min_labels).",
            "queue_id",
            "invalid_n_examples",
        )


def train_on(
    session: Session,
    state: AppState,
    caller: Caller,
    found: Export,
    *,
    form: str,
    filename: str,
    kind: str,
    model: str,
    training: Training,
    metadata: dict[str, str],
) -> dict[str, Any]:
    """Write an export (`form`: preference or unpaired) as a File, with `training.validation_fraction` of its
    prompts held out in a second File, and start a `kind` job on it from `model` (jobs.create_job, the same
    checks as OpenAI's job creation); the export object, with its job. The caller holds the scheduler's
    lock."""
    model = canonical(session, caller, model)  # `current` with nothing promoted: its own 404
    starting_point(session, state.settings, caller, model)  # a bad model fails before the file is written
    check_queue_quota(session, state.settings, caller.project_id)  # ... and so does a full queue
    seed = training.seed if training.seed is not None else secrets.randbelow(2**31)
    lines, held_out = held_out_split(found.lines, training.validation_fraction, seed)
    if training.validation_fraction and not held_out:
        raise bad_request(
            "Holding out prompts needs at least two different prompts.",
            "validation_fraction",
            "invalid_value",
        )
    enough_examples(len(lines), "the export once its held-out prompts are set aside")
    row = write_file(session, state, caller.project_id, filename, lines)
    valid = write_file(session, state, caller.project_id, "valid-" + filename, held_out) if held_out else None
    session.flush()
    hyperparameters = DpoHyperparameters().model_dump()
    if training.hyperparameters is not None:
        hyperparameters.update(training.hyperparameters.model_dump(exclude_unset=True))
    if kind == "reward_model":
        hyperparameters.pop("beta")
    job = create_job(
        session,
        state.settings,
        caller,
        kind,
        model,
        row.id,
        hyperparameters,
        validation_file=valid.id if valid else None,
        suffix=training.suffix,
        seed=seed,
        metadata=metadata,
    )
    counts = {"training_lines": len(lines), "validation_lines": len(held_out)}
    shown = export_object(row, form, found) | {"job": job_object(job, caller.project_id)}
    return shown | {
        "counts": shown["counts"] | counts,
        "validation_file": file_object(valid) if valid else None,
    }


@router.post("/feedback/queues/{queue_id}/train")
def train_from_queue(body: TrainCreate, state: State, caller: Auth, queue_id: str) -> dict[str, Any]:
    """Export the queue's verdicts and start a job on them: DPO and reward models on preference pairs, KTO
    on unpaired ratings (a pairwise queue's winners up, losers down)."""
    form = "unpaired" if body.method == "kto" else "preference"
    with state.scheduler.lock, state.store.session() as session:
        queue, form, found = _export(session, caller, queue_id, body, form)
        enough_examples(len(found.lines), f"queue {queue.id}")
        model = body.model or current_model(session, caller.project_id) or queue.model_a
        if model is None:
            raise bad_request("Say which model to train from: model.", "model", "missing_required_parameter")
        shown = train_on(
            session,
            state,
            caller,
            found,
            form=form,
            filename=_file_name(queue, form),
            kind=body.method,
            model=model,
            training=body,
            metadata={"feedback_queue": queue.id},
        )
    state.scheduler.wake()
    return shown
