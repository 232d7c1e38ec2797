"""Graders for the alpha endpoints and reinforcement jobs, run with `tunery.graders`.

string_check, text_similarity (but cosine), python and multi graders over them run in the API process,
on the grader runner's own threads (`GraderRunner`), never the API's: a python grader may take its whole
timeout, and a project's burst of them must not stall other requests. `tunery.graders` imports no torch
for them, and python graders run in their sandbox process anyway. score_model / label_model graders and
cosine similarity need a model, so they run in the inference worker. A model grader may name only the
service's base models (mapped to the local model they stand for): a request never chooses a path on the
server. Python graders need the kernel sandbox (`tunery.graders.sandbox`); a server that cannot provide it
refuses them with a 400 unless the operator opted out.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from tunery.server.errors import bad_request, too_many_requests
from tunery.server.fair import Admission, FairQueue, TooBusy
from tunery.server.settings import Settings

T = TypeVar("T")

MODEL_GRADERS = ("score_model", "label_model")


def _walk(grader: Any, path: str) -> list[tuple[dict[str, Any], str]]:
    """Every grader dict in `grader` (itself and a multi grader's sub-graders) with its JSON path."""
    if not isinstance(grader, dict):
        return []
    found = [(grader, path)]
    subs = grader.get("graders") if grader.get("type") == "multi" else None
    if isinstance(subs, dict) and not isinstance(subs.get("type"), str):
        for key, sub in subs.items():
            found += _walk(sub, f"{path}.graders.{key}")
    elif isinstance(subs, list):
        for i, sub in enumerate(subs):
            found += _walk(sub, f"{path}.graders[{i}]")
    elif isinstance(subs, dict):
        found += _walk(subs, f"{path}.graders")
    return found


def refuse_without_sandbox(grader: dict[str, Any], param: str = "grader") -> None:
    """A 400 for a grader with python code when this machine cannot confine it (and no opt-out)."""
    from tunery.graders.sandbox import SandboxUnavailable, require_sandbox

    for g, path in _walk(grader, param):
        if g.get("type") == "python":
            try:
                require_sandbox()
            except SandboxUnavailable as exc:
                raise bad_request(f"{path}: {exc}", path, "python_grader_unavailable") from None
            return


def needs_model(grader: dict[str, Any]) -> bool:
    return any(
        g.get("type") in MODEL_GRADERS
        or (g.get("type") == "text_similarity" and g.get("evaluation_metric") == "cosine")
        for g, _ in _walk(grader, "grader")
    )


def map_models(grader: dict[str, Any], settings: Settings, param: str = "grader") -> dict[str, Any]:
    """A copy of `grader` whose model graders name local models; a 400 for a model the service lacks."""
    mapped = copy.deepcopy(grader)
    for g, path in _walk(mapped, param):
        if g.get("type") in MODEL_GRADERS:
            name = g.get("model")
            if not isinstance(name, str) or name not in settings.base_models:
                raise bad_request(
                    f"{path}.model: '{name}' is not a model this service runs; use one of "
                    f"{', '.join(settings.base_models)} (`tunery serve --base-model NAME=LOCAL` adds names).",
                    f"{path}.model",
                    "invalid_grader",
                )
            g["model"] = settings.base_models[name]
    return mapped


def parse_here(grader: dict[str, Any], param: str = "grader") -> None:
    """Check a grader that needs no model, in this process; a 400 naming the bad field otherwise."""
    from tunery.errors import TuneryError
    from tunery.graders.spec import parse_grader

    try:
        parse_grader(grader, param)
    except TuneryError as exc:
        raise bad_request(str(exc), param, "invalid_grader") from None


def check_for_training(grader: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The grader a reinforcement job writes to its directory (model names mapped), checked as far as
    this process can; model graders are checked again when the recipe loads them."""
    param = "method.reinforcement.grader"
    refuse_without_sandbox(grader, param)
    mapped = map_models(grader, settings, param)
    if not needs_model(grader):
        parse_here(mapped, param)
    return mapped


def run_here(
    grader: dict[str, Any], model_sample: str, item: dict[str, Any], timeout: float
) -> dict[str, Any]:
    from tunery.errors import TuneryError
    from tunery.graders.run import build_grader, run_response
    from tunery.graders.sandbox import SandboxLimits

    try:
        built = build_grader(grader, limits=SandboxLimits(timeout=timeout))
    except TuneryError as exc:
        raise bad_request(str(exc), "grader", "invalid_grader") from None
    return run_response(built(model_sample, item), built)


class GraderRunner:
    """Runs graders on `grader_workers` threads of its own. Projects take turns (a FairQueue), and with two
    or more workers one project never holds them all; beyond `grader_in_flight` runs waiting or running
    (`grader_per_project` for one project) a request gets OpenAI's 429 at once."""

    def __init__(self, settings: Settings) -> None:
        self.workers = max(1, settings.grader_workers)
        self.admission = Admission(
            "python grader runs", settings.grader_in_flight, settings.grader_per_project
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
                thread = threading.Thread(target=self._work, name="tunery-grader", daemon=True)
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
        """Stop taking work; running graders finish within their timeout (the threads are daemons)."""
        self.queue.close()
