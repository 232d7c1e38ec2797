"""The feedback studio's API under /tunery/v1: labelling queues here, and what the studio's other route
files share. One file per resource:

    POST   /feedback/queues                        {name, mode, prompts_file, model_a, ...}      admin
    GET    /feedback/queues[/{id}]                 queues (a labeller's view has no models)      any key
    POST   /feedback/queues/{id}/generate          start a stopped generation again              admin

    feedback_items.py: a queue's items, the next one for a labeller, labels
    POST   /feedback/queues/{id}/items             {items: [{messages|prompt, answers}]}         admin
    GET    /feedback/queues/{id}/items             items, answers, models and labels             admin
    GET    /feedback/queues/{id}/next              the caller's next item, and progress          any key
    GET    /feedback/queues/{id}/progress          the queue's and the caller's progress         any key
    GET    /feedback/items/{id}                    one item as the caller sees it, own label     any key
    POST   /feedback/items/{id}/labels             {choice, comment?, seconds?}: committed now   any key

    feedback_exports.py: what a queue's labels make
    GET    /feedback/queues/{id}/quality           agreement, position and length bias, labellers admin
    POST   /feedback/queues/{id}/export            {format?, min_agreement?} -> a fine-tune File  admin
    POST   /feedback/queues/{id}/train             {method: dpo|kto|reward_model, model} -> File + job

    labellers.py: the people who label
    POST   /labellers                              {name} -> a labeller's key, shown once        admin
    GET    /labellers                              the project's labellers                       admin
    DELETE /labellers/{key_id}                     revoke a labeller's key                       admin

    ratings.py: ratings of stored chat completions
    POST   /ratings                                {completion_id, rating: up|down}              admin
    GET    /ratings                                ratings, newest first                         admin
    POST   /ratings/export | /ratings/train        ratings -> an unpaired File (a KTO job)       admin

    comparisons.py: blind comparisons of two models, and the project's current model

"any key" includes labellers' keys (deps.AnyRole); everything else refuses them with a 403. A labeller's
label is stored when given; the answers are shown in an order of the labeller's own
(tunery/server/feedback.py).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tunery.server.auth import Caller
from tunery.server.deps import AnyRole, AppState, Auth, State
from tunery.server.errors import bad_request, not_found
from tunery.server.feedback import (
    MAX_PROMPTS,
    QueueGenerators,
    chat_model,
    project_file,
    queue_counts,
    queue_object,
    read_prompts,
)
from tunery.server.feedback_store import FeedbackItem, FeedbackQueue
from tunery.server.schemas import Bounds, cursor_page
from tunery.server.store import ApiKey, new_id, now

router = APIRouter()

# --- what the studio's route files share ------------------------------------------------------------------


def get_generators(request: Request) -> QueueGenerators:
    generators = request.app.state.feedback
    assert isinstance(generators, QueueGenerators)
    return generators


Generators = Annotated[QueueGenerators, Depends(get_generators)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueueCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    mode: Literal["pairwise", "thumbs"] = "pairwise"
    prompts_file: str | None = None  # JSONL of prompts; without it, add items with their answers
    model_a: str | None = None
    model_b: str | None = None  # pairwise without model_b: two samples of model_a
    labels_per_item: Annotated[int, Bounds(ge=1, le=10)] = 1
    max_tokens: Annotated[int, Bounds(ge=1, le=4096)] | None = None
    temperature: Annotated[float, Bounds(ge=0, le=2)] = 1.0
    seed: Annotated[int, Bounds(ge=0, le=2**31 - 1)] | None = None  # the same answers on the same models
    max_prompts: Annotated[int, Bounds(ge=1, le=MAX_PROMPTS)] = MAX_PROMPTS
    instructions: str = Field("", max_length=4000)


def audit(state: AppState, caller: Caller, kind: str, payload: dict[str, Any]) -> None:
    if state.audit is not None:
        state.audit.append(caller.project_name, kind, payload, caller.key_id)


def names_of(session: Session, project_id: str) -> dict[str, str]:
    """Key id -> the name a report shows: a labeller's name, or "admin key_..." for an admin key."""
    rows = session.execute(select(ApiKey.id, ApiKey.role, ApiKey.name).where(ApiKey.project_id == project_id))
    return {
        key_id: name if role == "labeller" and name else f"admin {key_id[:12]}" for key_id, role, name in rows
    }


# --- queues -----------------------------------------------------------------------------------------------


def get_queue(session: Session, caller: Caller, queue_id: str) -> FeedbackQueue:
    queue = session.get(FeedbackQueue, queue_id)
    if queue is None or queue.project_id != caller.project_id:
        raise not_found("feedback queue", queue_id, "queue_id")
    return queue


def get_item(session: Session, caller: Caller, item_id: str) -> FeedbackItem:
    item = session.get(FeedbackItem, item_id)
    if item is None or item.project_id != caller.project_id:
        raise not_found("feedback item", item_id, "item_id")
    return item


def new_queue(
    session: Session,
    state: AppState,
    caller: Caller,
    body: QueueCreate,
    kind: str = "labelling",
    prompts: list[list[dict[str, str]]] | None = None,
    job_id: str | None = None,
) -> FeedbackQueue:
    """A queue and its pending items (one per prompt), checked: the models exist and can chat."""
    for param in ("model_a", "model_b"):
        name = getattr(body, param)
        if name is not None:  # kept by its own name: `current` would change under the queue
            setattr(body, param, chat_model(session, state, caller, name, param).name)
    if body.mode == "thumbs" and body.model_b is not None:
        raise bad_request("A thumbs queue rates one answer per prompt: leave out model_b.", "model_b")
    if body.prompts_file is not None and body.model_a is None:
        raise bad_request(
            "Say which model answers the prompts: model_a (and model_b to compare two models).",
            "model_a",
            "missing_required_parameter",
        )
    if body.prompts_file is None and (body.model_a or body.model_b):
        raise bad_request(
            "model_a and model_b answer the prompts of prompts_file; without one, add items with their answers "
            "(POST /tunery/v1/feedback/queues/{id}/items).",
            "prompts_file",
            "missing_required_parameter",
        )
    if body.mode == "pairwise" and body.model_a and not body.model_b and body.temperature == 0:
        raise bad_request(
            "Two answers from one model at temperature 0 are the same answer: raise the temperature or give "
            "model_b.",
            "temperature",
        )
    if body.prompts_file is not None and prompts is None:
        row = project_file(session, caller, body.prompts_file, "prompts_file")
        prompts = read_prompts(state.settings.files_dir / row.id, row.id, body.max_prompts)
    queue = FeedbackQueue(
        id=new_id("fq_"),
        project_id=caller.project_id,
        seq=int(session.scalar(select(func.max(FeedbackQueue.seq))) or 0) + 1,
        name=body.name,
        kind=kind,
        mode=body.mode,
        instructions=body.instructions,
        prompts_file=body.prompts_file,
        model_a=body.model_a,
        model_b=body.model_b,
        labels_per_item=body.labels_per_item,
        max_tokens=min(
            body.max_tokens or state.settings.default_max_tokens, state.settings.max_completion_tokens
        ),
        temperature=body.temperature,
        seed=body.seed,
        status="generating" if prompts else "ready",
        job_id=job_id,
        created_by=caller.key_id,
        created_at=now(),
        order_key=secrets.token_hex(16),
    )
    session.add(queue)
    session.flush()
    for position, messages in enumerate(prompts or []):
        session.add(
            FeedbackItem(
                id=new_id("fi_"),
                queue_id=queue.id,
                project_id=caller.project_id,
                position=position,
                messages=messages,
                status="pending",
                created_at=queue.created_at,
            )
        )
    return queue


def queue_view(session: Session, queue: FeedbackQueue, caller: Caller) -> dict[str, Any]:
    return queue_object(queue, queue_counts(session, [queue.id])[queue.id], caller.role == "admin")


@router.post("/feedback/queues")
def create_queue(body: QueueCreate, state: State, caller: Auth, generators: Generators) -> dict[str, Any]:
    with state.store.session() as session:
        queue = new_queue(session, state, caller, body)
        session.flush()
        shown = queue_view(session, queue, caller)
    audit(
        state,
        caller,
        "feedback.queue_created",
        {k: shown[k] for k in ("id", "name", "mode", "model_a", "model_b")},
    )
    if queue.status == "generating":
        generators.start(queue.id)
    return shown


@router.get("/feedback/queues")
def list_queues(
    state: State,
    caller: AnyRole,
    kind: Literal["labelling", "comparison"] | None = None,
    limit: int = Query(100, ge=1, le=500),
) -> dict[str, Any]:
    with state.store.session() as session:
        query = select(FeedbackQueue).where(FeedbackQueue.project_id == caller.project_id)
        if kind is not None:
            query = query.where(FeedbackQueue.kind == kind)
        rows = list(session.scalars(query.order_by(FeedbackQueue.seq.desc()).limit(limit + 1)))
        counts = queue_counts(session, [q.id for q in rows[:limit]])
        data = [queue_object(q, counts[q.id], caller.role == "admin") for q in rows[:limit]]
    if caller.role != "admin":  # a labeller sees what there is to label
        data = [q for q in data if q["items"]["ready"] or q["status"] == "generating"]
    return cursor_page(data, len(rows) > limit)


@router.get("/feedback/queues/{queue_id}")
def retrieve_queue(state: State, caller: AnyRole, queue_id: str) -> dict[str, Any]:
    with state.store.session() as session:
        return queue_view(session, get_queue(session, caller, queue_id), caller)


@router.post("/feedback/queues/{queue_id}/generate")
def restart_generation(state: State, caller: Auth, queue_id: str, generators: Generators) -> dict[str, Any]:
    with state.store.session() as session:
        queue = get_queue(session, caller, queue_id)
        pending = session.scalar(
            select(func.count()).where(FeedbackItem.queue_id == queue.id, FeedbackItem.status == "pending")
        )
        if not pending:
            raise bad_request(
                f"Queue {queue.id} has no items waiting for answers.", "queue_id", "nothing_to_generate"
            )
        queue.status, queue.error = "generating", None
        session.flush()
        shown = queue_view(session, queue, caller)
    generators.start(queue.id)
    return shown
