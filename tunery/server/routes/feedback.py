"""The feedback studio's API under /tunery/v1: labellers, labelling queues, labels, quality, exports,
training, and ratings of stored chat completions.

    POST   /labellers                              {name} -> a labeller's key, shown once        admin
    GET    /labellers                              the project's labellers                       admin
    DELETE /labellers/{key_id}                     revoke a labeller's key                       admin
    POST   /feedback/queues                        {name, mode, prompts_file, model_a, ...}      admin
    GET    /feedback/queues[/{id}]                 queues (a labeller's view has no models)      any key
    POST   /feedback/queues/{id}/items             {items: [{messages|prompt, answers}]}         admin
    GET    /feedback/queues/{id}/items             items, answers, models and labels             admin
    POST   /feedback/queues/{id}/generate          start a stopped generation again              admin
    GET    /feedback/queues/{id}/next              the caller's next item, and progress          any key
    GET    /feedback/queues/{id}/progress          the queue's and the caller's progress         any key
    GET    /feedback/items/{id}                    one item as the caller sees it, own label     any key
    POST   /feedback/items/{id}/labels             {choice, comment?, seconds?}: committed now   any key
    GET    /feedback/queues/{id}/quality           agreement, position and length bias, labellers admin
    POST   /feedback/queues/{id}/export            {format?, min_agreement?} -> a fine-tune File  admin
    POST   /feedback/queues/{id}/train             {method: dpo|kto|reward_model, model} -> File + job
    POST   /ratings                                {completion_id, rating: up|down}              admin
    GET    /ratings                                ratings, newest first                         admin
    POST   /ratings/export | /ratings/train        ratings -> an unpaired File (a KTO job)       admin

"any key" includes labellers' keys (deps.AnyRole); everything else refuses them with a 403. A labeller's
label is stored when given; the answers are shown in an order of the labeller's own (feedback.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tunery.server.auth import Caller, create_key
from tunery.server.deps import AnyRole, AppState, Auth, State
from tunery.server.errors import APIError, bad_request, not_found
from tunery.server.feedback import (
    MAX_PROMPTS,
    QueueGenerators,
    admin_item,
    chat_model,
    create_job,
    labeller_item,
    next_item,
    project_file,
    prompt_messages,
    queue_counts,
    queue_object,
    read_prompts,
    save_label,
    starting_point,
    write_file,
)
from tunery.server.feedback_report import EXPORT_RULE, Export, export_lines, quality_report, verdicts
from tunery.server.feedback_store import (
    FeedbackItem,
    FeedbackLabel,
    FeedbackQueue,
    ProjectModel,
    Rating,
    StoredCompletion,
)
from tunery.server.jobs import MIN_TRAINING_EXAMPLES
from tunery.server.schemas import Bounds, DpoHyperparameters, cursor_page, file_object, job_object
from tunery.server.store import ApiKey, new_id, now

router = APIRouter()


def get_generators(request: Request) -> QueueGenerators:
    generators = request.app.state.feedback
    assert isinstance(generators, QueueGenerators)
    return generators


Generators = Annotated[QueueGenerators, Depends(get_generators)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabellerCreate(Body):
    name: str = Field(min_length=1, max_length=64)


class QueueCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    mode: Literal["pairwise", "thumbs"] = "pairwise"
    prompts_file: str | None = None  # JSONL of prompts; without it, add items with their answers
    model_a: str | None = None
    model_b: str | None = None  # pairwise without model_b: two samples of model_a
    labels_per_item: Annotated[int, Bounds(ge=1, le=10)] = 1
    max_tokens: Annotated[int, Bounds(ge=1, le=4096)] | None = None
    temperature: Annotated[float, Bounds(ge=0, le=2)] = 1.0
    max_prompts: Annotated[int, Bounds(ge=1, le=MAX_PROMPTS)] = MAX_PROMPTS
    instructions: str = Field("", max_length=4000)


class ItemIn(Body):
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[dict[str, Any]] | None = None
    answers: list[str] = Field(min_length=1, max_length=2)
    models: list[str] | None = Field(None, max_length=2)  # who wrote each answer: never shown to labellers


class ItemsCreate(Body):
    items: list[ItemIn] = Field(min_length=1, max_length=MAX_PROMPTS)


class LabelCreate(Body):
    choice: Literal["left", "right", "tie", "both_bad", "up", "down"]
    comment: str | None = Field(None, max_length=4000)
    seconds: Annotated[float, Bounds(ge=0, le=86400)] | None = (
        None  # time spent on the item, as the page measured it
    )


class ExportCreate(Body):
    format: Literal["preference", "unpaired"] | None = (
        None  # default: preference (pairwise), unpaired (thumbs)
    )
    min_agreement: Annotated[float, Bounds(ge=0, le=1)] = 0.0
    min_labels: Annotated[int, Bounds(ge=1, le=10)] = 1


class TrainCreate(ExportCreate):
    method: Literal["dpo", "kto", "reward_model"]
    model: str | None = None  # default: the project's current model, else the queue's model_a
    suffix: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    hyperparameters: DpoHyperparameters | None = None


class RatingCreate(Body):
    completion_id: str = Field(min_length=1, max_length=64)
    rating: Literal["up", "down"]
    comment: str | None = Field(None, max_length=4000)
    choice_index: Annotated[int, Bounds(ge=0, le=15)] = 0
    user: str | None = Field(None, max_length=256)  # the application's end user (one rating each)


class RatingsExport(Body):
    model: str | None = None  # only completions of this model


class RatingsTrain(RatingsExport):
    train_model: str | None = None  # default: the project's current model, else `model`
    suffix: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    hyperparameters: DpoHyperparameters | None = None


def audit(state: AppState, caller: Caller, kind: str, payload: dict[str, Any]) -> None:
    if state.audit is not None:
        state.audit.append(caller.project_name, kind, payload, caller.key_id)


def names_of(session: Session, project_id: str) -> dict[str, str]:
    """Key id -> the name a report shows: a labeller's name, or "admin key_..." for an admin key."""
    rows = session.execute(select(ApiKey.id, ApiKey.role, ApiKey.name).where(ApiKey.project_id == project_id))
    return {
        key_id: name if role == "labeller" and name else f"admin {key_id[:12]}" for key_id, role, name in rows
    }


# --- labellers ---------------------------------------------------------------------------------------------


def _labeller_object(key: ApiKey, labels: int = 0) -> dict[str, Any]:
    return {
        "object": "tunery.labeller",
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "labels": labels,
    }


@router.post("/labellers")
def create_labeller(body: LabellerCreate, state: State, caller: Auth) -> dict[str, Any]:
    name = body.name.strip()
    with state.store.session() as session:
        taken = session.scalar(
            select(ApiKey.id).where(
                ApiKey.project_id == caller.project_id,
                ApiKey.role == "labeller",
                ApiKey.name == name,
                ApiKey.revoked_at.is_(None),
            )
        )
    if taken or not name:
        raise bad_request(
            f"A labeller named {name!r} already has a key in this project; labellers need names of their own.",
            "name",
            "labeller_exists",
        )
    key_id, key = create_key(state.store, caller.project_name, role="labeller", name=name)
    with state.store.session() as session:
        row = session.get(ApiKey, key_id)
        assert row is not None
    audit(state, caller, "labeller.created", {"labeller_key_id": key_id, "name": name})
    return _labeller_object(row) | {"key": key}


@router.get("/labellers")
def list_labellers(state: State, caller: Auth) -> dict[str, Any]:
    with state.store.session() as session:
        keys = session.scalars(
            select(ApiKey)
            .where(ApiKey.project_id == caller.project_id, ApiKey.role == "labeller")
            .order_by(ApiKey.created_at, ApiKey.name)
        ).all()
        counts = dict(
            session.execute(
                select(FeedbackLabel.labeller_key_id, func.count())
                .where(FeedbackLabel.labeller_key_id.in_([k.id for k in keys]))
                .group_by(FeedbackLabel.labeller_key_id)
            ).all()
        )
    return {
        "object": "list",
        "data": [_labeller_object(k, counts.get(k.id, 0)) for k in keys],
        "has_more": False,
    }


@router.delete("/labellers/{key_id}")
def revoke_labeller(state: State, caller: Auth, key_id: str) -> dict[str, Any]:
    with state.store.session() as session:
        key = session.get(ApiKey, key_id)
        if key is None or key.project_id != caller.project_id or key.role != "labeller":
            raise not_found("labeller", key_id, "key_id")
        key.revoked_at = key.revoked_at or now()
        shown = _labeller_object(key)
    state.keys.forget(key_id)
    audit(state, caller, "labeller.revoked", {"labeller_key_id": key_id, "name": key.name})
    return shown | {"deleted": True}


# --- queues ---------------------------------------------------------------------------------------------


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
        if name is not None:
            chat_model(session, state, caller, name, param)
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
        status="generating" if prompts else "ready",
        job_id=job_id,
        created_by=caller.key_id,
        created_at=now(),
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


def _queue_view(session: Session, queue: FeedbackQueue, caller: Caller) -> dict[str, Any]:
    return queue_object(queue, queue_counts(session, [queue.id])[queue.id], caller.role == "admin")


@router.post("/feedback/queues")
def create_queue(body: QueueCreate, state: State, caller: Auth, generators: Generators) -> dict[str, Any]:
    with state.store.session() as session:
        queue = new_queue(session, state, caller, body)
        session.flush()
        shown = _queue_view(session, queue, caller)
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
        return _queue_view(session, get_queue(session, caller, queue_id), caller)


@router.post("/feedback/queues/{queue_id}/items")
def add_items(body: ItemsCreate, state: State, caller: Auth, queue_id: str) -> dict[str, Any]:
    with state.store.session() as session:
        queue = get_queue(session, caller, queue_id)
        if queue.kind == "comparison":
            raise bad_request(
                "A comparison's answers come from its two models; add items to a labelling queue.", "queue_id"
            )
        want = 2 if queue.mode == "pairwise" else 1
        last = session.scalar(
            select(func.max(FeedbackItem.position)).where(FeedbackItem.queue_id == queue.id)
        )
        start = -1 if last is None else int(last)  # `or -1` took an only item's position 0 for none
        if start + 1 + len(body.items) > MAX_PROMPTS:  # a queue's labellers scan its items for the next
            raise bad_request(
                f"A queue holds at most {MAX_PROMPTS} items; this one has {start + 1}. Start another queue.",
                "items",
                "too_many_items",
            )
        added = []
        for i, given in enumerate(body.items):
            try:
                messages = prompt_messages(given.model_dump(exclude_none=True))
            except ValueError as exc:
                raise bad_request(f"items[{i}]: {exc}", f"items[{i}].messages") from None
            if len(given.answers) != want:
                raise bad_request(
                    f"items[{i}]: a {queue.mode} queue needs {want} answer{'s' * (want > 1)} per item, "
                    f"got {len(given.answers)}.",
                    f"items[{i}].answers",
                )
            models = (given.models or []) + [None, None]
            item = FeedbackItem(
                id=new_id("fi_"),
                queue_id=queue.id,
                project_id=caller.project_id,
                position=start + 1 + i,
                messages=messages,
                answer_1=given.answers[0],
                answer_2=given.answers[1] if want == 2 else None,
                model_1=models[0],
                model_2=models[1] if want == 2 else None,
                status="ready",
                created_at=now(),
            )
            session.add(item)
            added.append(item.id)
        session.flush()
        shown = _queue_view(session, queue, caller)
    return shown | {"added": added}


@router.get("/feedback/queues/{queue_id}/items")
def list_items(
    state: State,
    caller: Auth,
    queue_id: str,
    after: int = Query(
        -1, ge=-1, le=2**63 - 1, description="the position of the last item of the previous page"
    ),
    limit: int = Query(50, ge=1, le=500),
) -> dict[str, Any]:
    with state.store.session() as session:
        queue = get_queue(session, caller, queue_id)
        items = list(
            session.scalars(
                select(FeedbackItem)
                .where(FeedbackItem.queue_id == queue.id, FeedbackItem.position > after)
                .order_by(FeedbackItem.position)
                .limit(limit + 1)
            )
        )
        shown = items[:limit]
        labels = session.scalars(
            select(FeedbackLabel)
            .where(FeedbackLabel.item_id.in_([i.id for i in shown]))
            .order_by(FeedbackLabel.created_at, FeedbackLabel.id)
        ).all()
        names = names_of(session, caller.project_id)
    by_item: dict[str, list[FeedbackLabel]] = {}
    for label in labels:
        by_item.setdefault(label.item_id, []).append(label)
    found = verdicts(labels)
    data = []
    for item in shown:
        verdict = found.get(item.id)
        data.append(
            admin_item(item, by_item.get(item.id, []), names)
            | {
                "verdict": verdict.choice if verdict else None,
                "agreement": verdict.agreement if verdict else None,
            }
        )
    return cursor_page(data, len(items) > limit)


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
        shown = _queue_view(session, queue, caller)
    generators.start(queue.id)
    return shown


# --- labelling ---------------------------------------------------------------------------------------------


def progress(session: Session, queue: FeedbackQueue, key_id: str) -> dict[str, Any]:
    counts = queue_counts(session, [queue.id])[queue.id]
    labelled = session.execute(
        select(FeedbackLabel.item_id, FeedbackLabel.labeller_key_id).where(FeedbackLabel.queue_id == queue.id)
    ).all()
    per_item: dict[str, int] = {}
    mine = set()
    for item_id, key in labelled:
        per_item[item_id] = per_item.get(item_id, 0) + 1
        if key == key_id:
            mine.add(item_id)
    ready = session.scalars(
        select(FeedbackItem.id).where(FeedbackItem.queue_id == queue.id, FeedbackItem.status == "ready")
    ).all()
    left = sum(1 for i in ready if i not in mine and per_item.get(i, 0) < queue.labels_per_item)
    return {
        "object": "tunery.feedback_progress",
        "queue_id": queue.id,
        "status": queue.status,
        "items_ready": counts["ready"],
        "items_pending": counts["pending"],
        "labels": counts["labels"],
        "labels_needed": counts["ready"] * queue.labels_per_item,
        "labelled_by_me": len(mine),
        "left_for_me": left,
    }


@router.get("/feedback/queues/{queue_id}/next")
def next_for_me(state: State, caller: AnyRole, queue_id: str) -> dict[str, Any]:
    with state.store.session() as session:
        queue = get_queue(session, caller, queue_id)
        item = next_item(session, queue, caller.key_id)
        shown = labeller_item(item, queue, caller.key_id, None) if item is not None else None
        return {
            "object": "tunery.feedback_next",
            "queue": {
                "id": queue.id,
                "name": queue.name,
                "mode": queue.mode,
                "instructions": queue.instructions,
            },
            "item": shown,
            "progress": progress(session, queue, caller.key_id),
        }


@router.get("/feedback/queues/{queue_id}/progress")
def queue_progress(state: State, caller: AnyRole, queue_id: str) -> dict[str, Any]:
    with state.store.session() as session:
        return progress(session, get_queue(session, caller, queue_id), caller.key_id)


def _own_label(session: Session, item: FeedbackItem, key_id: str) -> FeedbackLabel | None:
    return session.scalar(
        select(FeedbackLabel).where(FeedbackLabel.item_id == item.id, FeedbackLabel.labeller_key_id == key_id)
    )


@router.get("/feedback/items/{item_id}")
def retrieve_item(state: State, caller: AnyRole, item_id: str) -> dict[str, Any]:
    with state.store.session() as session:
        item = get_item(session, caller, item_id)
        queue = session.get(FeedbackQueue, item.queue_id)
        assert queue is not None
        if item.status != "ready":
            raise bad_request(
                f"Item {item.id} has no answers yet ({item.status}).", "item_id", "item_not_ready"
            )
        return labeller_item(item, queue, caller.key_id, _own_label(session, item, caller.key_id))


@router.post("/feedback/items/{item_id}/labels")
def label_item(body: LabelCreate, state: State, caller: AnyRole, item_id: str) -> dict[str, Any]:
    """Store the caller's label at once (a second post changes it): a closed browser loses nothing."""
    with state.store.session() as session:
        item = get_item(session, caller, item_id)
        queue = session.get(FeedbackQueue, item.queue_id)
        assert queue is not None
        if item.status != "ready":
            raise bad_request(
                f"Item {item.id} has no answers yet ({item.status}).", "item_id", "item_not_ready"
            )
        allowed = ("left", "right", "tie", "both_bad") if queue.mode == "pairwise" else ("up", "down")
        if body.choice not in allowed:
            raise bad_request(
                f"A {queue.mode} item takes choice {', '.join(allowed)}; got '{body.choice}'.",
                "choice",
                "invalid_value",
            )
        label = save_label(session, item, caller.key_id, body.choice, body.comment, body.seconds)
        shown = labeller_item(item, queue, caller.key_id, label)
    # each label is a person's judgement that later trains a model: who gave it, on what, is on record
    record = {"queue_id": item.queue_id, "item_id": item.id, "label_id": label.id, "choice": body.choice}
    audit(state, caller, "feedback.label", record | {"comment": label.comment})
    return {
        "object": "tunery.feedback_label",
        "id": label.id,
        "item_id": item.id,
        "queue_id": item.queue_id,
        "choice": body.choice,
        "comment": label.comment,
        "seconds": label.seconds,
        "created_at": label.created_at,
        "updated_at": label.updated_at,
        "item": shown,
    }


# --- quality, export, train ---------------------------------------------------------------------------------


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


def _export_object(row: Any, form: str, found: Export) -> dict[str, Any]:
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
    return _export_object(row, form, found)


def _hyperparameters(kind: str, given: DpoHyperparameters | None) -> dict[str, Any]:
    values = DpoHyperparameters().model_dump()
    if given is not None:
        values.update(given.model_dump(exclude_unset=True))
    if kind == "reward_model":
        values.pop("beta")
    return values


def current_model(session: Session, project_id: str) -> str | None:
    row = session.get(ProjectModel, project_id)
    return row.current_model if row is not None else None


def _enough(count: int, what: str) -> None:
    if count < MIN_TRAINING_EXAMPLES:
        raise bad_request(
            f"That makes {count} training examples from {what}; a job needs at least {MIN_TRAINING_EXAMPLES}. "
            "Label more items (or lower min_agreement / min_labels).",
            "queue_id",
            "invalid_n_examples",
        )


@router.post("/feedback/queues/{queue_id}/train")
def train_from_queue(body: TrainCreate, state: State, caller: Auth, queue_id: str) -> dict[str, Any]:
    """Export the queue's verdicts and start a job on them: DPO and reward models on preference pairs, KTO
    on unpaired ratings (a pairwise queue's winners up, losers down)."""
    form = "unpaired" if body.method == "kto" else "preference"
    with state.scheduler.lock, state.store.session() as session:
        queue, form, found = _export(session, caller, queue_id, body, form)
        _enough(len(found.lines), f"queue {queue.id}")
        model = body.model or current_model(session, caller.project_id) or queue.model_a
        if model is None:
            raise bad_request("Say which model to train from: model.", "model", "missing_required_parameter")
        starting_point(session, state, caller, model)  # a bad model fails before the file is written
        row = write_file(session, state, caller.project_id, _file_name(queue, form), found.lines)
        session.flush()
        job = create_job(
            session,
            state,
            caller,
            body.method,
            model,
            row,
            _hyperparameters(body.method, body.hyperparameters),
            body.suffix,
            {"feedback_queue": queue.id},
        )
        shown = _export_object(row, form, found) | {"job": job_object(job, caller.project_id)}
    state.scheduler.wake()
    return shown


# --- ratings ------------------------------------------------------------------------------------------------


def _rating_object(rating: Rating) -> dict[str, Any]:
    return {
        "object": "tunery.rating",
        "id": rating.id,
        "completion_id": rating.completion_id,
        "choice_index": rating.choice_index,
        "rating": rating.rating,
        "comment": rating.comment,
        "user": rating.end_user or None,
        "created_at": rating.created_at,
        "updated_at": rating.updated_at,
    }


@router.post("/ratings")
def rate_completion(body: RatingCreate, state: State, caller: Auth) -> dict[str, Any]:
    with state.store.session() as session:
        completion = session.get(StoredCompletion, body.completion_id)
        if completion is None or completion.project_id != caller.project_id:
            # the same answer for another project's completion: it does not exist for this caller
            raise APIError(
                404,
                f"No stored completion '{body.completion_id}'. Only completions created with `store: true` can "
                "be rated: send `store: true` (`store=True` in the openai client) with the chat completion "
                "request.",
                "completion_id",
                "completion_not_found",
            )
        if body.choice_index >= len(completion.choices):
            raise bad_request(
                f"Completion {completion.id} has {len(completion.choices)} choice(s).",
                "choice_index",
                "invalid_value",
            )
        user = body.user or ""
        rating = session.scalar(
            select(Rating).where(
                Rating.completion_id == completion.id,
                Rating.choice_index == body.choice_index,
                Rating.key_id == caller.key_id,
                Rating.end_user == user,
            )
        )
        stamp = now()
        if rating is None:
            rating = Rating(
                id=new_id("rating_"),
                completion_id=completion.id,
                project_id=caller.project_id,
                key_id=caller.key_id,
                end_user=user,
                choice_index=body.choice_index,
                rating=body.rating,
                comment=body.comment,
                created_at=stamp,
                updated_at=stamp,
            )
            session.add(rating)
        else:
            rating.rating, rating.comment, rating.updated_at = body.rating, body.comment, stamp
        session.flush()
        rated = _rating_object(rating)
    audit(
        state,
        caller,
        "feedback.rating",
        {k: rated[k] for k in ("id", "completion_id", "choice_index", "rating", "comment", "user")},
    )
    return rated


@router.get("/ratings")
def list_ratings(state: State, caller: Auth, limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
    with state.store.session() as session:
        rows = session.execute(
            select(Rating, StoredCompletion.model)
            .join(StoredCompletion, StoredCompletion.id == Rating.completion_id)
            .where(Rating.project_id == caller.project_id)
            .order_by(Rating.updated_at.desc(), Rating.id)
            .limit(limit + 1)
        ).all()
        totals = dict(
            session.execute(
                select(Rating.rating, func.count())
                .where(Rating.project_id == caller.project_id)
                .group_by(Rating.rating)
            ).all()
        )
    page = cursor_page([_rating_object(r) | {"model": m} for r, m in rows[:limit]], len(rows) > limit)
    return page | {"totals": {"up": totals.get("up", 0), "down": totals.get("down", 0)}}


def _rating_lines(session: Session, caller: Caller, model: str | None) -> Export:
    """One line per rated answer, by the plurality of its ratings (a tie of up and down is left out)."""
    query = (
        select(Rating.completion_id, Rating.choice_index, Rating.rating)
        .join(StoredCompletion, StoredCompletion.id == Rating.completion_id)
        .where(Rating.project_id == caller.project_id)
    )
    if model is not None:
        query = query.where(StoredCompletion.model == model)
    votes: dict[tuple[str, int], list[str]] = {}
    for completion_id, index, rating in session.execute(query):
        votes.setdefault((completion_id, index), []).append(rating)
    completions = {
        c.id: c
        for c in session.scalars(
            select(StoredCompletion).where(StoredCompletion.id.in_({c for c, _ in votes}))
        )
    }
    found = Export()
    for (completion_id, index), given in sorted(votes.items()):
        up, down = given.count("up"), given.count("down")
        found.counts["items"] += 1
        if up == down:
            found.counts["conflicts"] += 1
            continue
        completion = completions[completion_id]
        messages = [
            m for m in completion.messages if m.get("role") in ("system", "user", "assistant", "tool")
        ]
        found.lines.append(
            {"messages": messages, "completion": completion.choices[index], "label": up > down}
        )
        found.counts["exported_items"] += 1
    found.counts["lines"] = len(found.lines)
    if not found.lines:
        raise bad_request(
            f"No ratings to export{f' for model {model}' if model else ''}.", "model", "nothing_to_export"
        )
    return found


@router.post("/ratings/export")
def export_ratings(state: State, caller: Auth, body: RatingsExport | None = None) -> dict[str, Any]:
    with state.store.session() as session:
        found = _rating_lines(session, caller, body.model if body else None)
        row = write_file(session, state, caller.project_id, "ratings.jsonl", found.lines)
    audit(
        state,
        caller,
        "feedback.exported",
        {"source": "ratings", "file_id": row.id, "counts": dict(found.counts)},
    )
    return _export_object(row, "unpaired", found)


@router.post("/ratings/train")
def train_from_ratings(body: RatingsTrain, state: State, caller: Auth) -> dict[str, Any]:
    with state.scheduler.lock, state.store.session() as session:
        found = _rating_lines(session, caller, body.model)
        _enough(len(found.lines), "the project's ratings")
        model = body.train_model or current_model(session, caller.project_id) or body.model
        if model is None:
            raise bad_request(
                "Say which model to train from: train_model.", "train_model", "missing_required_parameter"
            )
        starting_point(session, state, caller, model)
        row = write_file(session, state, caller.project_id, "ratings.jsonl", found.lines)
        session.flush()
        job = create_job(
            session,
            state,
            caller,
            "kto",
            model,
            row,
            _hyperparameters("kto", body.hyperparameters),
            body.suffix,
            {"feedback": "ratings"},
        )
        shown = _export_object(row, "unpaired", found) | {"job": job_object(job, caller.project_id)}
    state.scheduler.wake()
    return shown
