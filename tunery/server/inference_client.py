"""The API side of the inference workers (`tunery/server/inference.py`): starts them on first use, sends
requests over their stdin, and routes the replies on their stdout to the waiting requests by id. If a
worker dies, its waiting requests get a 503 and the next request it is picked for starts a new one.

`inference_workers` processes (`tunery serve --inference-workers N`) share the requests: each goes to the
worker that last served its model (each worker keeps `inference_cache` base models loaded and
`inference_adapters` adapters beside them), else to one that has its base model, unless that one has more
requests in hand than another: requests at once spread over the workers, and no model is loaded by every
worker.

Each request names its project: the worker serves projects in turn, and here at most
`inference_per_project` requests of one project (`inference_in_flight` of all) may wait or run; beyond
that a request gets OpenAI's 429 at once rather than a place in a queue that one project could fill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tunery.server.errors import APIError, too_many_requests
from tunery.server.fair import Admission, TooBusy
from tunery.server.settings import Settings

READY_TIMEOUT = 300.0  # seconds for the worker to import torch and say it is ready


def worker_command(settings: Settings) -> list[str]:
    """The inference worker's command line, here or as a Ray replica (which adds how it is reached)."""
    return [
        settings.python,
        "-m",
        "tunery.server.inference",
        "--cache",
        str(settings.inference_cache),
        "--adapters",
        str(settings.inference_adapters),
    ]


class RayReplicas:
    """Inference workers as Ray jobs on the cluster (`--executor ray --inference-replicas N`), each on a
    node with REPLICA_RESOURCES free, reached over TCP with a token only this API process knows (written
    under DATA_DIR/inference/, the owner's alone, on the storage every node sees)."""

    def __init__(self, settings: Settings) -> None:
        from tunery.server.jobs.executors import RayExecutor

        self.settings = settings
        self.executor = RayExecutor(settings.ray_address, settings.stop_grace_seconds)
        self.directory = settings.data_dir / "inference"
        self.api = secrets.token_hex(4)  # this API process: its replicas' names
        self.token_file = self.directory / f"token-{self.api}"
        self.runners: dict[int, Any] = {}
        self.started = 0
        self.lock = threading.Lock()

    def _submit(self, index: int, log_path: Path) -> tuple[str, int]:
        from tunery.server.jobs.executors import Resources

        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.lock:
            if not self.token_file.exists():  # created once, the owner's alone, never through a link
                fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_urlsafe(32))
            self.started += 1
            name = f"tunery-inference-{self.api}-{index}-{self.started}"
        announce = self.directory / f"{name}.json"
        head = urlparse(self.executor.address).hostname or "127.0.0.1"
        command = worker_command(self.settings) + [
            "--listen",
            "--token-file",
            str(self.token_file),
            "--announce",
            str(announce),
            "--route-to",
            head,
        ]
        resources = Resources(cpus=self.settings.inference_cpus, memory_gb=self.settings.inference_memory_gb)
        runner = self.executor.submit(name, command, self.directory, resources, log_path)
        self.runners[index] = runner
        deadline = time.monotonic() + READY_TIMEOUT
        while not announce.exists():
            code = runner.poll()
            if code is not None or time.monotonic() > deadline:
                runner.stop(force=True)
                raise APIError(
                    503,
                    f"An inference replica on the Ray cluster did not start ({runner.name}); see its log.",
                    type="server_error",
                )
            time.sleep(0.2)
        address = json.loads(announce.read_text())
        announce.unlink(missing_ok=True)
        return str(address["host"]), int(address["port"])

    async def start(self, index: int, log_path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = await asyncio.to_thread(self._submit, index, log_path)
        reader, writer = await asyncio.open_connection(host, port, limit=64 * 2**20)
        writer.write((self.token_file.read_text().strip() + "\n").encode())
        await writer.drain()
        return reader, writer

    def stop(self, index: int) -> None:
        """Stop the replica's Ray job (it exits by itself once its connection closes; this is in case it
        does not), off the event loop: the cluster's API may be slow."""
        runner = self.runners.pop(index, None)
        if runner is not None:
            threading.Thread(target=runner.stop, args=(False,), daemon=True).start()


class _Worker:
    """One inference worker process and the requests waiting on it."""

    def __init__(self, settings: Settings, index: int, replicas: RayReplicas | None = None) -> None:
        self.settings, self.index, self.replicas = settings, index, replicas
        self._proc: asyncio.subprocess.Process | None = None  # a local worker
        self._writer: asyncio.StreamWriter | None = None  # its stdin, or the replica's connection
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._next_id = 0
        self._start_lock: asyncio.Lock | None = None
        self.in_hand = 0  # requests sent or about to be
        # what it has loaded, as far as this process knows, newest last, as the worker keeps them: models
        # (base models as (model, base adapter), merged copies as (model, adapter, base adapter)) and
        # adapters beside their base (model, adapter, base adapter). A merged copy the worker makes where
        # an adapter cannot go beside its base is not known here.
        self.bases: list[tuple[Any, Any]] = []
        self.adapters: list[tuple[Any, Any, Any]] = []

    def _alive(self) -> bool:
        if self._writer is None or self._writer.is_closing():
            return False
        return self._proc is None or self._proc.returncode is None

    async def _ensure_started(self) -> asyncio.StreamWriter:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._alive():
                assert self._writer is not None
                return self._writer
            self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
            name = "inference.log" if self.index == 0 else f"inference-{self.index}.log"
            if self.replicas is not None:
                reader, writer = await self.replicas.start(self.index, self.settings.logs_dir / name)
            else:
                reader, writer = await self._start_process(name)
            try:
                line = await asyncio.wait_for(reader.readline(), READY_TIMEOUT)
                ready = json.loads(line) if line else {}
            except (TimeoutError, ValueError, OSError):
                ready = {}
            if ready.get("event") != "ready":
                self._stop()
                where = "an inference replica on the Ray cluster" if self.replicas else "the inference worker"
                raise APIError(503, f"{where} failed to start; see logs/{name}.", type="server_error")
            self._writer = writer
            self._reader = asyncio.create_task(self._read(reader))
            return writer

    async def _start_process(self, name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        log = (self.settings.logs_dir / name).open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *worker_command(self.settings),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                limit=64 * 2**20,
            )
        finally:
            log.close()
        assert proc.stdout is not None and proc.stdin is not None
        self._proc = proc
        return proc.stdout, proc.stdin

    def _stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        if self._writer is not None:
            self._writer.close()
        if self.replicas is not None:
            self.replicas.stop(self.index)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (OSError, ValueError):  # the connection broke, or a line past the limit
                line = b""
            if not line:
                break
            try:
                message = json.loads(line)
            except ValueError:
                continue
            waiting = self._pending.get(message.get("id", -1))
            if waiting is not None:
                waiting.put_nowait(message)
        # EOF: the worker is gone, and what it had loaded; fail whatever was waiting on it, and start another
        # for the next request
        self.bases, self.adapters = [], []
        if self._writer is not None:
            self._writer.close()
        for waiting in self._pending.values():
            waiting.put_nowait(
                {"event": "error", "status": 503, "message": "The inference worker stopped; try again."}
            )

    async def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write((json.dumps(message) + "\n").encode())
        await writer.drain()

    def _copy(self, model: tuple[Any, Any, Any]) -> Any:
        """What holds the model in the worker's models: its base model, or (`--inference-adapters 0`) a
        merged copy of its own."""
        name, adapter, base_adapter = model
        return model if adapter is not None and self.settings.inference_adapters < 1 else (name, base_adapter)

    def serves(self, model: tuple[Any, Any, Any]) -> bool:
        beside = model[1] is not None and self.settings.inference_adapters > 0
        return self._copy(model) in self.bases and (not beside or model in self.adapters)

    def has_base(self, model: tuple[Any, Any, Any]) -> bool:
        """Whether an adapter would be served here beside a base model the worker holds."""
        return self.settings.inference_adapters > 0 and (model[0], model[2]) in self.bases

    def note(self, model: tuple[Any, Any, Any]) -> None:
        _remember(self.bases, self._copy(model), self.settings.inference_cache)
        if model[1] is not None and self.settings.inference_adapters > 0:
            _remember(self.adapters, model, self.settings.inference_adapters)

    async def stream(self, request: dict[str, Any], project: str) -> AsyncGenerator[dict[str, Any], None]:
        writer = await self._ensure_started()
        self._next_id += 1
        request_id = self._next_id
        replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending[request_id] = replies
        finished = False
        try:
            await self._send(writer, {**request, "id": request_id, "project": project})
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
            if not finished and not writer.is_closing():
                with contextlib.suppress(Exception):
                    await self._send(writer, {"op": "cancel", "target": request_id})

    async def close(self) -> None:
        """Close the requests' stream: the worker answers what it has, then exits."""
        proc, writer = self._proc, self._writer
        self._proc = self._writer = None
        if writer is not None:
            writer.close()
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self.replicas is not None:
            self.replicas.stop(self.index)
        if self._reader is not None:
            self._reader.cancel()


def _remember(kept: list[Any], item: Any, size: int) -> None:
    """`item` used last, in a list of the `size` most recently used."""
    if item in kept:
        kept.remove(item)
    kept.append(item)
    del kept[: -max(1, size)]


class InferenceClient:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        replicas = RayReplicas(settings) if settings.inference_replicas else None
        count = settings.inference_replicas or settings.inference_workers
        self.workers = [_Worker(settings, i, replicas) for i in range(max(1, count))]
        self.admission = Admission(
            "inference requests", settings.inference_in_flight, settings.inference_per_project
        )

    def _pick(self, request: dict[str, Any]) -> _Worker:
        """The worker that has the request's model loaded (else its base model, which an adapter is served
        beside), unless it has more in hand than the least busy one; else the least busy (the first, for a
        model no one serves)."""
        model = (request.get("model"), request.get("adapter"), request.get("base_adapter"))
        idle = min(self.workers, key=lambda w: w.in_hand)
        warm = [w for w in self.workers if w.serves(model)] or [w for w in self.workers if w.has_base(model)]
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
