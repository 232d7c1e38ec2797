"""What every API request passes before a route sees it: the API key first, then the body's size and depth.

A route's `Auth` dependency runs only after FastAPI has read and parsed the body, so without this a caller
with no key could make the server hold a body of any size (or parse one of any depth) before its 401. Here
the key is checked from the Authorization header before a byte of the body is read; then the body is
read up to its cap (`max_request_bytes` for JSON, `max_upload_bytes` plus form overhead for an upload,
which streams on to its route) and a JSON body nested deeper than MAX_JSON_DEPTH is refused: deep data
would break the recursive code downstream (copies, encoders, the audit log) with a 500, or be stored and
break every later listing of it. Routes keep their own `Auth` (the key cache makes it cheap).
"""

from __future__ import annotations

import asyncio
import json
import re
import time

from anyio import to_thread
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunery.safety.audit import SERVICE_LOG, AuditLog
from tunery.server.auth import caller_of
from tunery.server.deps import AppState
from tunery.server.errors import APIError, error_response, too_many_requests
from tunery.server.fair import Admission, TooBusy

API_PREFIXES = ("/v1/", "/tunery/v1/")
PUBLIC_PATHS = frozenset({"/v1/openapi.json"})  # the only API path a request without a key may read
UPLOAD_PATH = "/v1/files"
UPLOAD_OVERHEAD = 64 * 2**10  # an upload's multipart headers and form fields, beyond the file itself
UPLOADS_AT_ONCE, UPLOADS_PER_PROJECT = 16, 4
BODY_IDLE_SECONDS = 60.0  # the longest a request body may go without a byte arriving
MAX_JSON_DEPTH = 64  # arrays and objects inside each other; real requests (schemas, graders) use < 20

# a JSON string, escapes included; an unterminated one runs to the end, so the scan never backtracks
_STRING = re.compile(rb'"[^"\\]*(?:\\.?[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def file_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"File is too large: the limit is {limit} bytes ({limit / 2**20:.0f} MB).",
        "file",
        "file_too_large",
    )


def request_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is too large: the limit is {limit} bytes ({limit / 2**20:.0f} MB) for a JSON "
        "request; upload large data as a file (POST /v1/files) and name its id.",
        None,
        "request_too_large",
    )


def too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON `body` nests arrays and objects more than `limit` deep (brackets inside strings
    do not count).

    >>> too_deep(b'{"a": [[1]], "b": "[[[["}', limit=3), too_deep(b"[[[[]]]]", limit=3)
    (False, True)
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for byte in _STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        depth += 1 if byte in b"[{" else -1
        if depth > limit:
            return True
    return False


class AuthFailures:
    """Failed authentications for the service's own audit log (SERVICE_LOG: they belong to no project), at
    most one record per client and reason a minute, with the count of those left out: a caller without a
    key must not be able to fill the disk through the log."""

    def __init__(self, audit: AuditLog, window: float = 60.0) -> None:
        self.audit, self.window = audit, window
        self._seen: dict[
            tuple[str, str], tuple[float, int]
        ] = {}  # (client, code) -> (window start, left out)

    async def record(self, scope: Scope, error: APIError) -> None:
        client = (scope.get("client") or ("unknown", 0))[0]
        key = (str(client), str(error.code))
        started, left_out = self._seen.get(key, (0.0, 0))
        moment = time.monotonic()
        if moment - started < self.window:
            self._seen[key] = (started, left_out + 1)
            return
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[key] = (moment, 0)
        record = {
            "client": client,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "code": error.code,
            "message": error.message,  # names the key by its first and last characters only
            "left_out_before": left_out,  # failures of this client and reason not recorded in the last window
        }
        await to_thread.run_sync(self.audit.append, SERVICE_LOG, "auth.failed", record, None)


class Limits:
    """Pure ASGI middleware for the API paths: a 401 before the body, a 413 past the cap, a 400 when too
    deep. Everything else (the web app's pages, the OpenAPI schema) passes untouched."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app, self.state = app, state
        self.failures = AuthFailures(state.audit) if state.audit is not None else None
        # an upload holds a connection and a partial file for as long as its client sends: a few at a time
        self.uploads = Admission("uploads", total=UPLOADS_AT_ONCE, per_project=UPLOADS_PER_PROJECT)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(API_PREFIXES) or path in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        upload = scope["method"] == "POST" and path == UPLOAD_PATH
        settings = self.state.settings
        limit = settings.max_upload_bytes + UPLOAD_OVERHEAD if upload else settings.max_request_bytes
        too_large = file_too_large(settings.max_upload_bytes) if upload else request_too_large(limit)
        body: bytes | None = None
        try:
            who = await caller_of(self.state.keys, self.state.store, headers.get("authorization"))
            declared = headers.get("content-length", "")
            # ASCII digits only: str.isdigit() also takes other scripts' digits ("³"), which int() refuses
            if declared.isascii() and declared.isdigit() and int(declared) > limit:
                raise too_large
            if not upload:
                body = await _read(receive, limit, too_large)
                if body is not None:
                    await _refuse_deep(body)
                    _refuse_lone_surrogates(body)
        except APIError as exc:
            if exc.status == 401 and self.failures is not None:
                await self.failures.record(scope, exc)
            await error_response(exc)(scope, receive, send)
            return
        if upload:  # streamed to disk by its route: counted on the way, never held here
            try:
                self.uploads.acquire(who.project_id)
            except TooBusy as busy:
                await error_response(too_many_requests(str(busy)))(scope, receive, send)
                return
            try:
                await self.app(scope, _counted(receive, limit, too_large), send)
            finally:
                self.uploads.release(who.project_id)
        elif body is not None:  # None: the client went away while sending, and nobody is left to answer
            await self.app(scope, _replay(body, receive), send)


async def _next(receive: Receive) -> Message:
    """The client's next message; a 408 when it sends nothing for BODY_IDLE_SECONDS (a stalled body holds
    a connection, and for an upload a partial file)."""
    try:
        return await asyncio.wait_for(receive(), BODY_IDLE_SECONDS)
    except TimeoutError:
        raise APIError(
            408, f"The request body stalled: nothing arrived for {BODY_IDLE_SECONDS:g} s.", None, "timeout"
        ) from None


async def _read(receive: Receive, limit: int, too_large: APIError) -> bytes | None:
    """The whole body (a JSON route reads it whole anyway), or the 413 as soon as it passes `limit`."""
    chunks, size = [], 0
    while True:
        message = await _next(receive)
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _refuse_lone_surrogates(body: bytes) -> None:
    """A 400 for a string holding half a UTF-16 pair (the JSON escape "\\ud800" alone): valid JSON, but no
    UTF-8 text, so echoing it back, storing it or logging it fails later with a 500. Checked only when
    the body has such an escape at all: pairs (emoji written as escapes) are fine."""
    if _SURROGATE.search(body) is None:
        return
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise APIError(
            400,
            "The JSON body holds a lone UTF-16 surrogate (an escape like \\ud800 without its pair), which is "
            "not text; send valid Unicode.",
            None,
            "invalid_json",
        ) from None
    except ValueError:
        return  # not JSON at all: the route's own parsing answers that


async def _refuse_deep(body: bytes) -> None:
    """A 400 for JSON nested deeper than MAX_JSON_DEPTH. The scan is linear but pure Python (~0.1 s for
    8 MB), so a body over 64 KiB is scanned off the event loop."""
    deep = await to_thread.run_sync(too_deep, body) if len(body) > 2**16 else too_deep(body)
    if deep:
        raise APIError(
            400,
            f"The JSON body is nested too deeply: at most {MAX_JSON_DEPTH} levels of arrays and objects "
            "inside each other.",
            None,
            "invalid_json",
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the body read here, then the client's own messages (a streaming response
    waits on them for the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _counted(receive: Receive, limit: int, too_large: APIError) -> Receive:
    """`receive` that raises the 413 once the body passes `limit` (a chunked upload has no length to check
    first). The upload route lets an APIError through, and the app's handler answers it."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await _next(receive)
        seen += len(message.get("body", b""))
        if seen > limit:
            raise too_large
        return message

    return counted
