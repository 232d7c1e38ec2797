"""The work of requests that takes real CPU time in the API process: python graders (each waits up to its
timeout on a sandboxed process) and moderation (a classifier and the personal-data detectors over up to
the request's text). It runs on threads of its own, never the API's, so a project's burst of it never
stalls other requests, and projects take turns there (tunery/server/fair.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from tunery.server.errors import too_many_requests
from tunery.server.fair import Admission, FairQueue, TooBusy
from tunery.server.settings import Settings

T = TypeVar("T")


class RequestWorkers:
    """Runs requests' CPU-bound work on `work_threads` threads of its own. Projects take turns (a
    FairQueue), and with two or more threads one project never holds them all; beyond `work_in_flight`
    runs waiting or running (`work_per_project` for one project) a request gets OpenAI's 429 at once."""

    def __init__(self, settings: Settings) -> None:
        self.workers = max(1, settings.work_threads)
        self.admission = Admission(
            "grader and moderation runs", settings.work_in_flight, settings.work_per_project
        )
        self.queue: FairQueue[tuple[Future[Any], Callable[[], Any]]] = FairQueue(
            running_per_key=max(1, self.workers - 1)
        )
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    async def run(self, project: str, fn: Callable[[], T]) -> T:
        """`fn()` on a grader thread; a 429 when the caps are reached. A caller that goes away while
        its run waits cancels it: the run is skipped."""
        try:
            self.admission.acquire(project)
        except TooBusy as exc:
            raise too_many_requests(str(exc)) from None
        future: Future[Any] = Future()
        future.add_done_callback(lambda _done: self.admission.release(project))
        self._start()
        self.queue.put(project, (future, fn))
        result: T = await asyncio.wrap_future(future)
        return result

    def _start(self) -> None:
        with self._lock:
            while len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work, name="tunery-work", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        while (got := self.queue.get()) is not None:
            project, (future, fn) = got
            try:
                if future.set_running_or_notify_cancel():  # False: cancelled while it waited
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # the waiting request re-raises it
                        future.set_exception(exc)
            finally:
                self.queue.done(project)

    def close(self) -> None:
        """Stop taking work; what runs finishes (a grader within its timeout; the threads are daemons)."""
        self.queue.close()
