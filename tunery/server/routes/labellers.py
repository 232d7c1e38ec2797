"""Labellers under /tunery/v1: the people who label in the feedback studio, each with a key of their own
(role `labeller`: only the labelling endpoints) and a display name. Admin keys only.

    POST   /labellers               {name} -> a labeller's key, shown once
    GET    /labellers               the project's labellers, with their number of labels
    DELETE /labellers/{key_id}      revoke a labeller's key
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field
from sqlalchemy import func, select

from tunery.server.auth import create_key
from tunery.server.deps import Auth, State
from tunery.server.errors import bad_request, not_found
from tunery.server.feedback_store import FeedbackLabel
from tunery.server.routes.feedback import Body, audit
from tunery.server.store import ApiKey, now

router = APIRouter()


class LabellerCreate(Body):
    name: str = Field(min_length=1, max_length=64)


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
