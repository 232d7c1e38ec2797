"""API keys: `Authorization: Bearer <key>`. Keys are random, shown once, and stored as SHA-256 hashes
(a slow password hash buys nothing for 256-bit random keys). Each key belongs to one project, and every
object the API returns belongs to the caller's project: another project's object does not exist.

A key's role is `admin` (the whole API) or `labeller` (a person labelling in the feedback studio, with a
display name). Routes take `Auth` (admin keys only: a labeller's key gets a 403) unless they are part of
labelling and take `AnyRole`; so a route added later is closed to labellers until it says otherwise."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from anyio import to_thread
from fastapi import Request
from sqlalchemy import select

from tunery.server.errors import APIError
from tunery.server.store import ApiKey, Project, Store, new_id, now

KEY_PREFIX = "sk-tunery-"
ROLES = ("admin", "labeller")
PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class Caller:
    project_id: str
    project_name: str
    key_id: str = ""  # which key: the audit log names it (never the key itself)
    role: str = "admin"  # admin | labeller
    name: str | None = None  # a labeller's display name


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    store: Store, project_name: str, role: str = "admin", name: str | None = None
) -> tuple[str, str]:
    """A new key for `project_name` (the project is created on first use): (key id, key). A labeller's
    key (`role="labeller"`) needs the labeller's `name`."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: use one of {', '.join(ROLES)}")
    if role == "labeller" and not (name and name.strip() and len(name.strip()) <= 64):
        raise ValueError("a labeller's key needs the labeller's name (1-64 characters)")
    if not PROJECT_NAME.match(project_name):
        raise ValueError(
            f"project name {project_name!r}: use 1-63 lowercase letters, digits, '-' or '_' "
            "(it becomes part of fine-tuned model names)"
        )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with store.session() as session:
        project = session.scalar(select(Project).where(Project.name == project_name))
        if project is None:
            project = Project(id=new_id("proj_"), name=project_name, created_at=now())
            session.add(project)
            session.flush()
        key_id = new_id("key_", 16)
        session.add(
            ApiKey(
                id=key_id,
                project_id=project.id,
                key_hash=hash_key(key),
                prefix=key[:14],
                created_at=now(),
                role=role,
                name=name.strip() if name else None,
            )
        )
    return key_id, key


def list_keys(store: Store) -> list[tuple[str, str, str, int, int | None, str, str | None]]:
    """(key id, project name, key prefix, created_at, revoked_at, role, labeller name) of every key."""
    with store.session() as session:
        rows = session.execute(
            select(
                ApiKey.id,
                Project.name,
                ApiKey.prefix,
                ApiKey.created_at,
                ApiKey.revoked_at,
                ApiKey.role,
                ApiKey.name,
            )
            .join(Project, Project.id == ApiKey.project_id)
            .order_by(ApiKey.created_at)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def revoke_key(store: Store, key_id: str) -> bool:
    with store.session() as session:
        key = session.get(ApiKey, key_id)
        if key is None:
            return False
        key.revoked_at = key.revoked_at or now()
    return True


def authenticate(store: Store, authorization: str | None) -> Caller:
    if not authorization:
        raise APIError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). Create one with "
            "`tunery keys create --project NAME`.",
            code="missing_api_key",
        )
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise APIError(401, "Authorization header must be 'Bearer YOUR_KEY'.", code="invalid_api_key")
    with store.session() as session:
        row = session.execute(
            select(Project.id, Project.name, ApiKey.id, ApiKey.role, ApiKey.name)
            .join(ApiKey, ApiKey.project_id == Project.id)
            .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
        ).first()
    if row is None:
        shown = key[:8] + "*" * 8 + key[-4:] if len(key) > 12 else "*" * len(key)
        raise APIError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
    return Caller(project_id=row[0], project_name=row[1], key_id=row[2], role=row[3], name=row[4])


class KeyCache:
    """Recently seen keys -> their project, for `ttl` seconds: a polling client costs no key lookup per
    request. A key revoked with `tunery keys revoke` (another process) stops working within `ttl`."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._seen: dict[str, tuple[Caller, float]] = {}

    def get(self, authorization: str) -> Caller | None:
        hit = self._seen.get(authorization)
        if hit is None or time.monotonic() - hit[1] > self.ttl:
            return None
        return hit[0]

    def forget(self, key_id: str) -> None:
        """Drop a key revoked by this process at once (other processes' revocations wait out `ttl`)."""
        self._seen = {k: v for k, v in self._seen.items() if v[0].key_id != key_id}

    def put(self, authorization: str, who: Caller) -> None:
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[authorization] = (who, time.monotonic())


async def caller(request: Request) -> Caller:
    """FastAPI dependency (`Auth`): the project of the request's admin key; a 401 without a valid key, a
    403 for a labeller's key."""
    who = await any_caller(request)
    if who.role != "admin":
        raise APIError(
            403,
            f"This key belongs to labeller '{who.name}' and can only label in the feedback studio "
            "(/tunery/v1/feedback/...); ask a project admin for anything else.",
            code="insufficient_permissions",
        )
    return who


async def any_caller(request: Request) -> Caller:
    """FastAPI dependency (`AnyRole`): the project of the request's API key, whatever its role, or a 401."""
    state = request.app.state.tunery
    return await caller_of(state.keys, state.store, request.headers.get("authorization"))


async def caller_of(keys: KeyCache, store: Store, authorization: str | None) -> Caller:
    """The caller an Authorization header names, or a 401: from the key cache, else from the database in a
    worker thread (a lookup must not block the event loop). Used by `any_caller` and by the middleware that
    authenticates a request before its body is read (middleware.py)."""
    if authorization:
        cached = keys.get(authorization)
        if cached is not None:
            return cached
    who: Caller = await to_thread.run_sync(authenticate, store, authorization)
    if authorization:
        keys.put(authorization, who)
    return who
