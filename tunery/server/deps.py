"""What every route needs, held on `app.state`: the store, the settings, the scheduler, the inference
worker, the audit log, and the caller's project (from the API key)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from tunery.safety.audit import AuditLog
from tunery.server.auth import Caller, KeyCache, any_caller, caller
from tunery.server.errors import APIError
from tunery.server.fair import RateLimit
from tunery.server.inference_client import InferenceClient
from tunery.server.jobs import Scheduler
from tunery.server.settings import Settings
from tunery.server.store import Store
from tunery.server.workers import RequestWorkers


@dataclass
class AppState:
    store: Store
    settings: Settings
    scheduler: Scheduler
    inference: InferenceClient
    started_at: int  # the `created` time of base models
    keys: KeyCache = field(default_factory=KeyCache)
    audit: AuditLog | None = None  # None when `--no-audit`
    workers: RequestWorkers = field(init=False)  # python graders' and moderation's threads (workers.py)
    grader_runs: RateLimit = field(init=False)  # per project a minute (settings.grader_runs_per_minute)

    def __post_init__(self) -> None:
        self.workers = RequestWorkers(self.settings)
        self.grader_runs = RateLimit("grader runs", self.settings.grader_runs_per_minute)


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.tunery
    return state


State = Annotated[AppState, Depends(get_state)]
Auth = Annotated[Caller, Depends(caller)]
AnyRole = Annotated[Caller, Depends(any_caller)]  # labellers' keys too (auth.py)


T = TypeVar("T")


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled when the client hangs up first. A streamed answer notices the hang-up when it next
    writes; a plain one would otherwise be computed to its end for nobody, holding the inference worker
    (and its project's places) for as long as it takes."""
    task = asyncio.ensure_future(work)
    gone = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if not gone.is_set():  # this request itself is cancelled (the server stopping): let it go on
            raise
        # an answer for nobody: a plain error, not a cancellation that the server logs as a crash
        raise APIError(
            499, "The client closed the connection before the answer.", code="client_closed"
        ) from None
    finally:
        watcher.cancel()
