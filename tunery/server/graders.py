"""Graders for the alpha endpoints and reinforcement jobs, run with `tunery.graders`.

string_check, text_similarity (but cosine), python and multi graders over them run in the API process,
on the request workers' threads (`workers.py`), never the API's: a python grader may take its whole
timeout, and a project's burst of them must not stall other requests. `tunery.graders` imports no torch
for them, and python graders run in their sandbox process anyway. score_model / label_model graders and
cosine similarity need a model, so they run in the inference worker. A model grader may name only the
service's base models (mapped to the local model they stand for): a request never chooses a path on the
server. Python graders need the kernel sandbox (`tunery.graders.sandbox`); a server that cannot provide it
refuses them with a 400 unless the operator opted out.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from tunery.server.errors import bad_request
from tunery.server.settings import Settings

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

    try:  # one time budget for the whole request: a multi's python graders share it
        limits = SandboxLimits(timeout=timeout, deadline=time.monotonic() + timeout)
        built = build_grader(grader, limits=limits)
    except TuneryError as exc:
        raise bad_request(str(exc), "grader", "invalid_grader") from None
    return run_response(built(model_sample, item), built)
