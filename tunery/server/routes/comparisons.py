"""Blind comparisons of two models by people, and the project's current model, under /tunery/v1.

    POST /comparisons                {candidate, baseline, prompts_file} or {job}: a blind pairwise queue
    GET  /comparisons[/{id}]         the result: wins, losses, ties, win rate, 95% interval, recommendation
                                     (`review_safety` for a winner whose training run raised safety flags)
    GET  /projects/current_model     the model the project serves as its current one, and its history
    POST /projects/current_model     {model, comparison_id?}: promote (admin)

A comparison is a feedback queue of kind `comparison` (its items are labelled at /feedback/queues/{id}/next
like any other): the candidate writes answer_1 and the baseline answer_2 of every item, and each labeller
sees them in an order of their own, models hidden. The current model lives only in this namespace:
/v1/models stays OpenAI's.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tunery.server.auth import Caller
from tunery.server.catalog import canonical, current_model, job_dir
from tunery.server.deps import Auth, State
from tunery.server.errors import bad_request, not_found
from tunery.server.feedback import (
    MAX_PROMPTS,
    chat_model,
    project_file,
    queue_counts,
    read_prompts,
)
from tunery.server.feedback_report import comparison_result
from tunery.server.feedback_store import FeedbackItem, FeedbackLabel, FeedbackQueue, ProjectModel
from tunery.server.jobs.reports import finished_summary
from tunery.server.routes.feedback import Body, Generators, QueueCreate, audit, new_queue
from tunery.server.schemas import Bounds
from tunery.server.settings import Settings
from tunery.server.store import Job, now

# promotions a project's current model keeps in its history (each promotion rewrites the row)
HISTORY_KEPT = 100

router = APIRouter()

INSTRUCTIONS = (
    "Which answer is better for the person who asked? Judge helpfulness, correctness and tone; "
    "the answers come from two models, in random order."
)


class ComparisonCreate(Body):
    candidate: str | None = None
    baseline: str | None = None
    job: str | None = None  # a succeeded job: its model is the candidate
    prompts_file: str | None = None  # default with `job`: its validation file, else its training file
    name: str | None = Field(None, min_length=1, max_length=200)
    # the queue's own checks (QueueCreate), so that a request accepted here always makes its queue
    labels_per_item: Annotated[int, Bounds(ge=1, le=10)] = 1
    max_prompts: Annotated[int, Bounds(ge=1, le=MAX_PROMPTS)] = 50
    max_tokens: Annotated[int, Bounds(ge=1, le=4096)] | None = None
    temperature: Annotated[float, Bounds(ge=0, le=2)] = 0.7
    seed: Annotated[int, Bounds(ge=0, le=2**31 - 1)] | None = None  # both models sample with item k's seed
    instructions: str = Field(INSTRUCTIONS, max_length=4000)


class Promotion(Body):
    model: str = Field(min_length=1)
    comparison_id: str | None = None  # the comparison that decided it, kept in the history


def _comparison(session: Session, caller: Caller, comparison_id: str) -> FeedbackQueue:
    queue = session.get(FeedbackQueue, comparison_id)
    if queue is None or queue.project_id != caller.project_id or queue.kind != "comparison":
        raise not_found("comparison", comparison_id, "comparison_id")
    return queue


def candidate_safety_flags(session: Session, settings: Settings, queue: FeedbackQueue) -> list[str]:
    """The safety flags of the run whose model the comparison's candidate is (a checkpoint or a base model
    has none): the evaluations on which it got worse than its base. (`{job, candidate}` may name another
    model than the job's: the candidate's own run counts.)"""
    job = session.scalar(
        select(Job).where(Job.project_id == queue.project_id, Job.fine_tuned_model == queue.model_a)
    )
    summary = finished_summary(job_dir(settings, job.id) / "run") if job is not None else None
    return list(summary.safety_flags) if summary is not None else []


def comparison_object(
    session: Session, settings: Settings, queue: FeedbackQueue, current: str | None
) -> dict[str, Any]:
    items = list(
        session.scalars(
            select(FeedbackItem).where(FeedbackItem.queue_id == queue.id, FeedbackItem.status == "ready")
        )
    )
    labels = list(session.scalars(select(FeedbackLabel).where(FeedbackLabel.queue_id == queue.id)))
    counts = queue_counts(session, [queue.id])[queue.id]
    return {
        "object": "tunery.comparison",
        "id": queue.id,
        "name": queue.name,
        "candidate": queue.model_a,
        "baseline": queue.model_b,
        "job_id": queue.job_id,
        "status": queue.status,
        "error": queue.error,
        "created_at": queue.created_at,
        "labels_per_item": queue.labels_per_item,
        "items": {
            "total": counts["pending"] + counts["ready"] + counts["failed"],
            "ready": counts["ready"],
            "pending": counts["pending"],
            "failed": counts["failed"],
        },
        "labels": counts["labels"],
        "result": comparison_result(items, labels, candidate_safety_flags(session, settings, queue)),
        "current_model": current,
        "promoted": current is not None and current == queue.model_a,
    }


@router.post("/comparisons")
def create_comparison(
    body: ComparisonCreate, state: State, caller: Auth, generators: Generators
) -> dict[str, Any]:
    with state.store.session() as session:
        candidate, baseline, prompts_file = body.candidate, body.baseline, body.prompts_file
        job = None
        if body.job is not None:
            job = session.get(Job, body.job)
            if job is None or job.project_id != caller.project_id:
                raise not_found("fine-tuning job", body.job, "job")
            if job.status != "succeeded" or not job.fine_tuned_model or job.model_deleted:
                raise bad_request(
                    f"Job {job.id} has no model to compare (it is {job.status}"
                    f"{', its model deleted' if job.model_deleted else ''}).",
                    "job",
                    "job_not_succeeded",
                )
            candidate = candidate or job.fine_tuned_model
            current = current_model(session, caller.project_id)
            baseline = baseline or (current if current and current != candidate else job.model)
            prompts_file = prompts_file or job.validation_file or job.training_file
        if candidate is None or baseline is None:
            raise bad_request(
                "Give candidate and baseline (models), or job (a succeeded job: its model against the project's "
                "current model, or the model it started from).",
                "candidate" if candidate is None else "baseline",
                "missing_required_parameter",
            )
        # each checked under its own name here: the queue's own check would name model_a and model_b
        candidate = chat_model(
            session, state, caller, canonical(session, caller, candidate, "candidate"), "candidate"
        ).name
        baseline = chat_model(
            session, state, caller, canonical(session, caller, baseline, "baseline"), "baseline"
        ).name
        if candidate == baseline:
            raise bad_request("The candidate and the baseline are the same model.", "baseline")
        if prompts_file is None:
            raise bad_request(
                "Give prompts_file: the prompts both models answer.",
                "prompts_file",
                "missing_required_parameter",
            )
        row = project_file(session, caller, prompts_file, "prompts_file")
        prompts = read_prompts(state.settings.files_dir / row.id, row.id, body.max_prompts)
        number = int(
            session.scalar(
                select(func.count()).where(
                    FeedbackQueue.project_id == caller.project_id, FeedbackQueue.kind == "comparison"
                )
            )
            or 0
        )
        spec = QueueCreate(
            # labellers see the queue's name: it never names the models
            name=body.name or f"Blind comparison {number + 1}",
            mode="pairwise",
            prompts_file=row.id,
            model_a=candidate,
            model_b=baseline,
            labels_per_item=body.labels_per_item,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            seed=body.seed,
            max_prompts=body.max_prompts,
            instructions=body.instructions,
        )
        queue = new_queue(session, state, caller, spec, "comparison", prompts, job.id if job else None)
        session.flush()
        shown = comparison_object(session, state.settings, queue, current_model(session, caller.project_id))
    audit(
        state,
        caller,
        "feedback.comparison_created",
        {"id": queue.id, "candidate": candidate, "baseline": baseline},
    )
    generators.start(queue.id)
    return shown


@router.get("/comparisons")
def list_comparisons(state: State, caller: Auth, limit: int = Query(50, ge=1, le=200)) -> dict[str, Any]:
    with state.store.session() as session:
        rows = list(
            session.scalars(
                select(FeedbackQueue)
                .where(FeedbackQueue.project_id == caller.project_id, FeedbackQueue.kind == "comparison")
                .order_by(FeedbackQueue.seq.desc())
                .limit(limit + 1)
            )
        )
        current = current_model(session, caller.project_id)
        data = [comparison_object(session, state.settings, q, current) for q in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit}


@router.get("/comparisons/{comparison_id}")
def retrieve_comparison(state: State, caller: Auth, comparison_id: str) -> dict[str, Any]:
    with state.store.session() as session:
        queue = _comparison(session, caller, comparison_id)
        return comparison_object(session, state.settings, queue, current_model(session, caller.project_id))


# --- the current model ------------------------------------------------------------------------------------


def _current_object(row: ProjectModel | None) -> dict[str, Any]:
    return {
        "object": "tunery.current_model",
        "model": row.current_model if row else None,
        "updated_at": row.updated_at if row else None,
        "history": list(row.history) if row else [],
    }


@router.get("/projects/current_model")
def get_current_model(state: State, caller: Auth) -> dict[str, Any]:
    with state.store.session() as session:
        return _current_object(session.get(ProjectModel, caller.project_id))


@router.post("/projects/current_model")
def promote(body: Promotion, state: State, caller: Auth) -> dict[str, Any]:
    with state.store.session() as session:
        promoted = chat_model(
            session, state, caller, body.model, "model"
        ).name  # `current` is no name to keep
        if body.comparison_id is not None:
            _comparison(session, caller, body.comparison_id)
        row = session.get(ProjectModel, caller.project_id)
        if row is None:
            row = ProjectModel(project_id=caller.project_id, current_model=None, history=[], updated_at=now())
            session.add(row)
        change: dict[str, Any] = {
            "model": promoted,
            "previous": row.current_model,
            "at": now(),
            "key_id": caller.key_id,
            "comparison_id": body.comparison_id,
        }
        row.current_model, row.updated_at = promoted, change["at"]
        # a new list (the JSON column sees the change), of the last HISTORY_KEPT: the audit log has them all
        row.history = [*row.history, change][-HISTORY_KEPT:]
        session.flush()
        shown = _current_object(row)
    audit(state, caller, "model.promoted", change)
    return shown
