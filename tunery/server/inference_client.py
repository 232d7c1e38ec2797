"""The API side of the inference workers (`tunery/server/inference.py`): starts them on first use, sends
requests over their stdin, and routes the replies on their stdout to the waiting requests by id. If a
worker dies, its waiting requests get a 503 and the next request it is picked for starts a new one.

`inference_workers` processes (`tunery serve --inference-workers N`) share the requests: each goes to the
worker that last served its model (base model and adapter; each worker keeps `inference_cache` loaded),
unless that one has more requests in hand than another, so several fine-tuned adapters of one base are
answered side by side and no adapter is loaded by every worker.

Each request names its project: the worker serves projects in turn, and here at most
`inference_per_project` requests of one project (`inference_in_flight` of all) may wait or run; beyond
that a request gets OpenAI's 429 at once rather than a place in a queue that one project could fill."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from tunery.server.errors import APIError, too_many_requests
from tunery.server.fair import Admission, TooBusy
from tunery.server.settings import Settings

READY_TIMEOUT = 300.0  # seconds for the worker to import torch and say it is ready


class _Worker:
    """One inference worker process and the requests waiting on it."""

    def __init__(self, settings: Settings, index: int) -> None:
        self.settings, self.index = settings, index
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._next_id = 0
        self._start_lock: asyncio.Lock | None = None
        self.in_hand = 0  # requests sent or about to be
        self.models: list[tuple[Any, Any, Any]] = []  # (model, adapter, base adapter) it served, newest last

    async def _ensure_started(self) -> asyncio.subprocess.Process:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._proc is not None and self._proc.returncode is None:
                return self._proc
            self.models = []
            self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
            name = "inference.log" if self.index == 0 else f"inference-{self.index}.log"
            log = (self.settings.logs_dir / name).open("ab")
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.settings.python,
                    "-m",
                    "tunery.server.inference",
                    "--cache",
                    str(self.settings.inference_cache),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    limit=64 * 2**20,
                )
            finally:
                log.close()
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
                ready = json.loads(line) if line else {}
            except (TimeoutError, ValueError):
                ready = {}
            if ready.get("event") != "ready":
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise APIError(
                    503, f"The inference worker failed to start; see logs/{name}.", type="server_error"
                )
            self._proc = proc
            self._reader = asyncio.create_task(self._read(proc))
            return proc

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            waiting = self._pending.get(message.get("id", -1))
            if waiting is not None:
                waiting.put_nowait(message)
        # EOF: the worker is gone; fail whatever was waiting on it
        for waiting in self._pending.values():
            waiting.put_nowait(
                {"event": "error", "status": 503, "message": "The inference worker stopped; try again."}
            )

    async def _send(self, proc: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(message) + "\n").encode())
        await proc.stdin.drain()

    def serves(self, model: tuple[Any, Any, Any]) -> bool:
        return model in self.models

    def note(self, model: tuple[Any, Any, Any]) -> None:
        if model in self.models:
            self.models.remove(model)
        self.models.append(model)
        del self.models[: -max(1, self.settings.inference_cache)]

    async def stream(self, request: dict[str, Any], project: str) -> AsyncGenerator[dict[str, Any], None]:
        proc = await self._ensure_started()
        self._next_id += 1
        request_id = self._next_id
        replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending[request_id] = replies
        finished = False
        try:
            await self._send(proc, {**request, "id": request_id, "project": project})
            while True:
                message = await replies.get()
                if message.get("event") == "error":
                    finished = True
                    status = int(message.get("status", 500))
                    kind = "invalid_request_error" if status < 500 else "server_error"
                    raise APIError(
                        status, str(message.get("message")), message.get("param"), message.get("code"), kind
                    )
                if message.get("event") == "done":
                    finished = True
                yield message
                if finished:
                    return
        finally:
            self._pending.pop(request_id, None)
            if not finished and proc.returncode is None:
                with contextlib.suppress(Exception):
                    await self._send(proc, {"op": "cancel", "target": request_id})

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            self._reader.cancel()


class InferenceClient:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers = [_Worker(settings, i) for i in range(max(1, settings.inference_workers))]
        self.admission = Admission(
            "inference requests", settings.inference_in_flight, settings.inference_per_project
        )

    def _pick(self, request: dict[str, Any]) -> _Worker:
        """The worker that has the request's model loaded, unless it has more in hand than the least busy
        one; else the least busy (the first, for a model no one serves)."""
        model = (request.get("model"), request.get("adapter"), request.get("base_adapter"))
        idle = min(self.workers, key=lambda w: w.in_hand)
        warm = [w for w in self.workers if w.serves(model)]
        worker = min(warm, key=lambda w: w.in_hand) if warm else idle
        if worker.in_hand > idle.in_hand:
            worker = idle
        if request.get("model") is not None:
            worker.note(model)
        return worker

    async def stream(self, request: dict[str, Any], project: str) -> AsyncIterator[dict[str, Any]]:
        """The worker's replies to `request` for `project` (deltas, then `done`); an `error` reply raises
        APIError, and so does a full queue (429). Closing the iterator early (the client went away)
        cancels the request in the worker."""
        try:
            self.admission.acquire(project)
        except TooBusy as exc:
            raise too_many_requests(str(exc)) from None
        worker = self._pick(request)
        worker.in_hand += 1
        replies = worker.stream(request, project)
        try:
            async for message in replies:
                yield message
        finally:
            worker.in_hand -= 1
            try:
                await replies.aclose()  # now, not when collected: the worker hears of a cancel at once
            finally:
                self.admission.release(project)

    async def call(self, request: dict[str, Any], project: str) -> dict[str, Any]:
        async for message in self.stream(request, project):
            if message.get("event") == "done":
                result: dict[str, Any] = message.get("result") or {}
                return result
        raise APIError(503, "The inference worker gave no answer; try again.", type="server_error")

    async def close(self) -> None:
        await asyncio.gather(*(worker.close() for worker in self.workers))
