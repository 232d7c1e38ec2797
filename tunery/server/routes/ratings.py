"""Ratings of stored chat completions under /tunery/v1: an application's users rate the answers of chat
completions created with `store: true`; the ratings become an unpaired File, and a KTO job on it.

    POST   /ratings                          {completion_id, rating: up|down}              admin
    GET    /ratings                          ratings, newest first                         admin
    POST   /ratings/export | /ratings/train  ratings -> an unpaired File (a KTO job)       admin
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tunery.server.auth import Caller
from tunery.server.catalog import canonical, current_model
from tunery.server.deps import Auth, State
from tunery.server.errors import APIError, bad_request
from tunery.server.feedback import write_file
from tunery.server.feedback_report import Export
from tunery.server.feedback_store import Rating, StoredCompletion
from tunery.server.routes.feedback import Body, audit
from tunery.server.routes.feedback_exports import Training, enough_examples, export_object, train_on
from tunery.server.schemas import Bounds, cursor_page
from tunery.server.store import new_id, now

router = APIRouter()


class RatingCreate(Body):
    completion_id: str = Field(min_length=1, max_length=64)
    rating: Literal["up", "down"]
    comment: str | None = Field(None, max_length=4000)
    choice_index: Annotated[int, Bounds(ge=0, le=15)] = 0
    user: str | None = Field(None, max_length=256)  # the application's end user (one rating each)


class RatingsExport(Body):
    model: str | None = None  # only completions of this model


class RatingsTrain(RatingsExport, Training):
    train_model: str | None = None  # default: the project's current model, else `model`


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
        query = query.where(StoredCompletion.model == canonical(session, caller, model))
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
    return export_object(row, "unpaired", found)


@router.post("/ratings/train")
def train_from_ratings(body: RatingsTrain, state: State, caller: Auth) -> dict[str, Any]:
    with state.scheduler.lock, state.store.session() as session:
        found = _rating_lines(session, caller, body.model)
        enough_examples(len(found.lines), "the project's ratings")
        model = body.train_model or current_model(session, caller.project_id) or body.model
        if model is None:
            raise bad_request(
                "Say which model to train from: train_model.", "train_model", "missing_required_parameter"
            )
        shown = train_on(
            session,
            state,
            caller,
            found,
            form="unpaired",
            filename="ratings.jsonl",
            kind="kto",
            model=model,
            training=body,
            metadata={"feedback": "ratings"},
        )
    state.scheduler.wake()
    return shown
