"""A feedback queue's items and their labels, under /tunery/v1 (the studio's URLs: routes/feedback.py).

An admin adds items with their answers, or lists them with answers, models and labels; a labeller (any
key) gets the next item to label, sees an item as they saw it, and labels it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tunery.server.auth import Caller
from tunery.server.deps import AnyRole, Auth, State
from tunery.server.errors import bad_request
from tunery.server.feedback import (
    MAX_PROMPTS,
    admin_item,
    labeller_item,
    next_item,
    prompt_messages,
    queue_counts,
    save_label,
)
from tunery.server.feedback_report import verdicts
from tunery.server.feedback_store import FeedbackItem, FeedbackLabel, FeedbackQueue
from tunery.server.routes.feedback import Body, audit, get_item, get_queue, names_of, queue_view
from tunery.server.schemas import Bounds, cursor_page
from tunery.server.store import new_id, now

router = APIRouter()


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


# --- items ------------------------------------------------------------------------------------------------


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
        shown = queue_view(session, queue, caller)
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


# --- labelling --------------------------------------------------------------------------------------------


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


def _ready_item(session: Session, caller: Caller, item_id: str) -> tuple[FeedbackItem, FeedbackQueue]:
    """The caller's project's item and its queue, once the item has its answers to label."""
    item = get_item(session, caller, item_id)
    queue = session.get(FeedbackQueue, item.queue_id)
    assert queue is not None
    if item.status != "ready":
        raise bad_request(f"Item {item.id} has no answers yet ({item.status}).", "item_id", "item_not_ready")
    return item, queue


def _own_label(session: Session, item: FeedbackItem, key_id: str) -> FeedbackLabel | None:
    return session.scalar(
        select(FeedbackLabel).where(FeedbackLabel.item_id == item.id, FeedbackLabel.labeller_key_id == key_id)
    )


@router.get("/feedback/items/{item_id}")
def retrieve_item(state: State, caller: AnyRole, item_id: str) -> dict[str, Any]:
    with state.store.session() as session:
        item, queue = _ready_item(session, caller, item_id)
        return labeller_item(item, queue, caller.key_id, _own_label(session, item, caller.key_id))


@router.post("/feedback/items/{item_id}/labels")
def label_item(body: LabelCreate, state: State, caller: AnyRole, item_id: str) -> dict[str, Any]:
    """Store the caller's label at once (a second post changes it): a closed browser loses nothing."""
    with state.store.session() as session:
        item, queue = _ready_item(session, caller, item_id)
        allowed = ("left", "right", "tie", "both_bad") if queue.mode == "pairwise" else ("up", "down")
        if body.choice not in allowed:
            raise bad_request(
                f"A {queue.mode} item takes choice {', '.join(allowed)}; got '{body.choice}'.",
                "choice",
                "invalid_value",
            )
        label = save_label(session, item, queue, caller.key_id, body.choice, body.comment, body.seconds)
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
