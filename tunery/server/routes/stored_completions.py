"""Stored chat completions, as OpenAI's API has them: a chat completion created with `store: true` can be
listed, read back, tagged and deleted (`client.chat.completions.list/retrieve/update/delete` and
`client.chat.completions.messages.list` in the openai client). A project sees its own only; another
project's completion is a 404, as if it did not exist.

    GET    /chat/completions                    ?model= &metadata[k]=v &after= &limit= &order=asc|desc
    GET    /chat/completions/{id}               the chat.completion object as answered
    POST   /chat/completions/{id}               {metadata}: replaces the completion's metadata
    DELETE /chat/completions/{id}               the completion and its ratings (the audit log keeps its record)

Updates and deletions are audited (completion.updated, completion.deleted).
    GET    /chat/completions/{id}/messages      the request's messages, ?after= &limit= &order=
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict
from sqlalchemy import and_, delete, exists, func, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from tunery.server.auth import Caller
from tunery.server.catalog import canonical
from tunery.server.deps import Auth, State
from tunery.server.errors import APIError, bad_request
from tunery.server.feedback_store import Rating, StoredCompletion
from tunery.server.routes.chat import FINGERPRINT
from tunery.server.routes.feedback import audit
from tunery.server.schemas import Metadata, cursor_page, metadata_filter

router = APIRouter()

Order = Literal["asc", "desc"]


class CompletionUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: Metadata | None


def _not_found(completion_id: str, param: str = "completion_id") -> APIError:
    return APIError(
        404,
        f"No stored chat completion '{completion_id}'. Only completions created with `store: true` are "
        "kept: send `store: true` (`store=True` in the openai client) with the chat completion request.",
        param,
        "completion_not_found",
    )


def _stored(
    session: Session, caller: Caller, completion_id: str, param: str = "completion_id"
) -> StoredCompletion:
    row = session.get(StoredCompletion, completion_id)
    if row is None or row.project_id != caller.project_id:
        raise _not_found(completion_id, param)
    return row


def completion_object(row: StoredCompletion) -> dict[str, Any]:
    """The chat.completion the client was answered, with the metadata it was stored with. Rows from before
    the object was kept are rebuilt from their texts (usage and finish reasons were not kept then)."""
    answer = row.response or {
        "id": row.id,
        "object": "chat.completion",
        "created": row.created_at,
        "model": row.model,
        "system_fingerprint": FINGERPRINT,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i, text in enumerate(row.choices)
        ],
        "usage": None,
    }
    return {**answer, "metadata": row.completion_metadata or {}, "request_id": None}


def _has_pair(key: str, value: str, sqlite: bool) -> ColumnElement[bool]:
    """metadata[key] == value. SQLite's JSON paths cannot name every key (one with a double quote), so there
    the pairs are looked up with json_each; PostgreSQL's ->> takes any key as a plain string."""
    if not sqlite:
        same: ColumnElement[bool] = StoredCompletion.completion_metadata[key].as_string() == value
        return same
    pairs = func.json_each(StoredCompletion.completion_metadata).table_valued("key", "value")
    return exists(select(pairs.c.key).where(pairs.c.key == key, pairs.c.value == value))


def _key(row: StoredCompletion) -> tuple[int, int, str]:
    return row.created_at, row.seq or 0, row.id


def _after(order: Order, key: tuple[int, int, str]) -> ColumnElement[bool]:
    """Rows after `key` in the listing's order: by creation time, then the order within a second, then id."""
    created, seq, ident = (
        StoredCompletion.created_at,
        func.coalesce(StoredCompletion.seq, 0),
        StoredCompletion.id,
    )

    def beyond(column: Any, value: Any) -> ColumnElement[bool]:
        compared: ColumnElement[bool] = column > value if order == "asc" else column < value
        return compared

    return or_(
        beyond(created, key[0]),
        and_(created == key[0], beyond(seq, key[1])),
        and_(created == key[0], seq == key[1], beyond(ident, key[2])),
    )


@router.get("/chat/completions")
def list_stored(  # a thread of its own: a metadata filter may scan every stored completion of the project
    request: Request,
    state: State,
    caller: Auth,
    model: str | None = Query(None, max_length=256),
    after: str | None = Query(None, max_length=64),
    limit: int = Query(20, ge=1, le=100),
    order: Order = "asc",
) -> dict[str, Any]:
    filtering, pairs = metadata_filter(request)
    with state.store.session() as session:
        rows = select(StoredCompletion).where(StoredCompletion.project_id == caller.project_id)
        if model is not None:
            rows = rows.where(StoredCompletion.model == canonical(session, caller, model))
        if filtering:
            if pairs is None:  # metadata=null: completions stored without any
                rows = rows.where(StoredCompletion.completion_metadata.is_(None))
            sqlite = session.get_bind().dialect.name == "sqlite"
            for key, value in (pairs or {}).items():
                rows = rows.where(_has_pair(key, value, sqlite))
        if after:
            rows = rows.where(_after(order, _key(_stored(session, caller, after, "after"))))
        columns = (StoredCompletion.created_at, func.coalesce(StoredCompletion.seq, 0), StoredCompletion.id)
        rows = rows.order_by(*(c.asc() if order == "asc" else c.desc() for c in columns))
        found = list(session.scalars(rows.limit(limit + 1)).all())
        return cursor_page([completion_object(r) for r in found[:limit]], len(found) > limit, with_ids=True)


@router.get("/chat/completions/{completion_id}")
async def retrieve_stored(completion_id: str, state: State, caller: Auth) -> dict[str, Any]:
    return await state.store.read(lambda session: completion_object(_stored(session, caller, completion_id)))


@router.post("/chat/completions/{completion_id}")
def update_stored(completion_id: str, body: CompletionUpdate, state: State, caller: Auth) -> dict[str, Any]:
    with state.store.session() as session:
        row = _stored(session, caller, completion_id)
        previous, row.completion_metadata = row.completion_metadata, body.metadata
        session.flush()
        shown = completion_object(row)
    audit(
        state,
        caller,
        "completion.updated",
        {"completion_id": completion_id, "metadata": body.metadata, "previous": previous},
    )
    return shown


@router.delete("/chat/completions/{completion_id}")
def delete_stored(completion_id: str, state: State, caller: Auth) -> dict[str, Any]:
    with state.store.session() as session:
        row = _stored(session, caller, completion_id)
        ratings = session.scalar(select(func.count()).where(Rating.completion_id == row.id))
        session.execute(delete(Rating).where(Rating.completion_id == row.id))
        session.delete(row)
    audit(state, caller, "completion.deleted", {"completion_id": completion_id, "ratings_deleted": ratings})
    return {"object": "chat.completion.deleted", "id": completion_id, "deleted": True}


@router.get("/chat/completions/{completion_id}/messages")
async def list_messages(
    completion_id: str,
    state: State,
    caller: Auth,
    after: str | None = Query(None, max_length=96),
    limit: int = Query(20, ge=1, le=100),
    order: Order = "asc",
) -> dict[str, Any]:
    def query(session: Session) -> dict[str, Any]:
        row = _stored(session, caller, completion_id)
        messages = [
            {
                "id": f"{row.id}-{i}",
                "role": m.get("role"),
                "content": m.get("content"),
                "name": m.get("name"),
                "content_parts": None,
                **({"tool_calls": m["tool_calls"]} if m.get("tool_calls") else {}),
            }
            for i, m in enumerate(row.messages)
        ]
        if order == "desc":
            messages.reverse()
        if after:
            ids = [m["id"] for m in messages]
            if after not in ids:
                raise bad_request(f"No message '{after}' in completion {row.id}.", "after", "invalid_value")
            messages = messages[ids.index(after) + 1 :]
        return cursor_page(messages[:limit], len(messages) > limit, with_ids=True)

    return await state.store.read(query)
