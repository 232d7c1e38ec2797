"""The FastAPI application: OpenAI's fine-tuning API under /v1.

    uvicorn-free:  tunery serve [--host 127.0.0.1] [--port 8000] [--data-dir DIR] [--database-url URL]
    in Python:     app = create_app(Settings(data_dir=...))

The app owns a scheduler thread (`jobs/`) and the inference worker (`inference_client.py`); both start
with the app and stop with it.
"""

from __future__ import annotations

import gc
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import FastAPI

from tunery.graders.sandbox import sandbox_status
from tunery.safety.audit import AuditLog
from tunery.server.deps import AppState
from tunery.server.errors import install_handlers
from tunery.server.feedback import QueueGenerators
from tunery.server.inference_client import InferenceClient
from tunery.server.jobs import Scheduler, audit_job_changes
from tunery.server.middleware import Limits
from tunery.server.routes import (
    chat,
    comparisons,
    dashboard,
    feedback,
    feedback_exports,
    feedback_items,
    files,
    graders,
    jobs,
    labellers,
    models,
    moderations,
    ratings,
    stored_completions,
)
from tunery.server.routes.files import remove_partial_uploads
from tunery.server.settings import Settings
from tunery.server.store import Store, now

log = logging.getLogger("tunery.server")


class RequestId:
    """Every response carries an `x-request-id` header, which OpenAI's client keeps as `_request_id`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ("req_" + secrets.token_hex(16)).encode()

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def make_private(settings: Settings) -> None:
    """DATA_DIR and the directories the service writes in it are the owner's alone (0700): they hold
    people's training data, models, logs and the database. Made before anything writes there, and an
    older install's 0755 directories are closed too. Files inside are 0600 by `tunery serve`'s umask."""
    directories = [settings.data_dir, settings.files_dir, settings.jobs_dir, settings.logs_dir]
    for directory in directories + ([settings.audit_dir] if settings.audit else []):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            directory.chmod(0o700)
        except PermissionError:  # another user's directory, shared on purpose: theirs to decide
            log.warning("%s belongs to another user; left as it is (not made private)", directory)


def create_app(settings: Settings | None = None, run_scheduler: bool = True) -> FastAPI:
    settings = settings or Settings.from_env()
    make_private(settings)
    store = Store(settings.database_url)  # a TuneryError for a damaged database (store.py)
    audit = (
        AuditLog(settings.audit_dir, settings.audit_redact, settings.audit_fsync) if settings.audit else None
    )
    if audit is not None:
        audit_job_changes(store, audit)
    state = AppState(
        store, settings, Scheduler(store, settings, audit), InferenceClient(settings), now(), audit=audit
    )

    generators = QueueGenerators(state)  # the feedback studio's answer writing (feedback.py)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        remove_partial_uploads(settings.files_dir)
        # whether python graders can be confined here: found once, off the event loop (it runs one)
        log.info("%s", (await to_thread.run_sync(sandbox_status)).describe())
        if run_scheduler:
            state.scheduler.start()
        await generators.resume()
        # A full collection walks every object the imports made (FastAPI, pydantic, SQLAlchemy: 50-80 ms
        # on a small CPU), stalling every request in flight. Frozen objects are never walked again.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            state.workers.close()
            await generators.stop()
            await state.inference.close()
            if run_scheduler:
                await to_thread.run_sync(state.scheduler.stop)
            store.close()
            if audit is not None:
                audit.close()

    app = FastAPI(
        title="Tunery",
        summary="OpenAI-compatible fine-tuning on your own machine",
        lifespan=lifespan,
        # no /docs or /redoc: their pages load scripts from a CDN (unpinned, and offline they fail) into
        # the web app's origin, where a browser may keep an API key; the schema stays at /v1/openapi.json
        docs_url=None,
        redoc_url=None,
        openapi_url="/v1/openapi.json",
    )
    app.state.tunery = state
    app.state.feedback = generators
    install_handlers(app)
    for module in (files, jobs, models, chat, stored_completions, graders, moderations):
        app.include_router(module.router, prefix="/v1")
    # the web app: its own endpoints under /tunery/v1, its pages at / (routes/dashboard.py)
    app.include_router(dashboard.router, prefix="/tunery/v1")
    # the feedback studio (routes/feedback.py lists its URLs)
    for module in (labellers, feedback, feedback_items, feedback_exports, ratings, comparisons):
        app.include_router(module.router, prefix="/tunery/v1")
    dashboard.mount_web(app)
    app.add_middleware(Limits, state=state)  # key, size and depth before any route reads a body
    app.add_middleware(RequestId)  # added last: outermost, so Limits' answers carry the id too
    return app


MAX_CONNECTIONS = 1000  # open connections and requests at once; past it uvicorn answers 503


def serve(app: FastAPI, settings: Settings, log_level: str = "info", access_log: bool = False) -> None:
    """Run `app` (from `create_app(settings)`) under uvicorn. No access log by default: a line per poll of
    50 clients costs real CPU.

    uvicorn never times out a connection that has not sent its headers, so thousands of idle ones (no key
    needed) used up the server's descriptors: a connection gets `settings.header_seconds` for each request's
    headers.
    Per-client connection limits and slow-body rates belong to a reverse proxy when the service is exposed
    beyond this machine."""
    import asyncio

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadersInTime(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None

        def _expect_headers(self) -> None:
            self._headers_arrived()
            self._timer = self.loop.call_later(settings.header_seconds, self._too_slow)

        def _headers_arrived(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _too_slow(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._expect_headers()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._expect_headers()

        def on_headers_complete(self) -> None:
            self._headers_arrived()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_arrived()
            super().connection_lost(exc)

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=access_log,
        http=HeadersInTime,
        limit_concurrency=MAX_CONNECTIONS,
    )
