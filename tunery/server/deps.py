"""What every route needs, held on `app.state`: the store, the settings, the scheduler, the inference
worker, the audit log, and the caller's project (from the API key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from tunery.safety.audit import AuditLog
from tunery.server.auth import Caller, KeyCache, any_caller, caller
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

    def __post_init__(self) -> None:
        self.workers = RequestWorkers(self.settings)


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.tunery
    return state


State = Annotated[AppState, Depends(get_state)]
Auth = Annotated[Caller, Depends(caller)]
AnyRole = Annotated[Caller, Depends(any_caller)]  # labellers' keys too (auth.py)
