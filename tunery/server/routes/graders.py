"""OpenAI's alpha grader endpoints: validate a grader, run one on a sample.

Graders that need a model run in the inference worker; the others (python graders among them) run on the
request workers' threads (`server/workers.py`), never on the API's own. Each run is in the audit log, a
grader past AUDIT_GRADER_BYTES and a sample or item past AUDIT_DATA_BYTES by its size and SHA-256 (16
concurrent runs on 4 MB samples had written 61 MB to the log in 0.7 s; string checks of 60 KB fields, 64 KB
a field, 83 MB a second), and a project starts at most `grader_runs_per_minute` runs (429 beyond)."""

from __future__ import annotations

from typing import Any

from anyio import CancelScope, to_thread
from fastapi import APIRouter, Request

from tunery.safety.audit import bounded
from tunery.server import graders
from tunery.server.deps import Auth, State, unless_gone
from tunery.server.errors import APIError, too_many_requests
from tunery.server.fair import TooBusy
from tunery.server.schemas import GraderRun, GraderValidate

router = APIRouter()

# what ran (the grader) is kept whole up to this size, the caller's own data (sample, item) up to the other
AUDIT_GRADER_BYTES = 16 * 1024
AUDIT_DATA_BYTES = 1024


@router.post("/fine_tuning/alpha/graders/validate")
async def validate_grader(body: GraderValidate, state: State, caller: Auth) -> dict[str, Any]:
    graders.refuse_without_sandbox(body.grader)
    mapped = graders.map_models(body.grader, state.settings)
    if graders.needs_model(body.grader):
        request = {"op": "grade", "grader": mapped, "validate_only": True}
        await state.inference.call(request, caller.project_id)
    else:  # parsing is quick: no need to wait in line behind graders that run code
        await to_thread.run_sync(graders.parse_here, mapped)
    return {"grader": body.grader}


@router.post("/fine_tuning/alpha/graders/run")
async def run_grader(body: GraderRun, state: State, caller: Auth, http: Request) -> dict[str, Any]:
    try:
        state.grader_runs.take(caller.project_id)  # before anything runs or is recorded
    except TooBusy as exc:
        raise too_many_requests(str(exc)) from None
    graders.refuse_without_sandbox(body.grader)
    mapped = graders.map_models(body.grader, state.settings)
    item = body.item if body.item is not None else {}
    if body.item is None and body.reference_answer is not None:
        item = {"reference_answer": body.reference_answer}
    timeout = state.settings.grader_timeout
    response: dict[str, Any] = {}
    failure: str | None = None
    try:
        if graders.needs_model(body.grader):
            request = {
                "op": "grade",
                "grader": mapped,
                "model_sample": body.model_sample,
                "item": item,
                "timeout": timeout,
            }
            response = await unless_gone(http, state.inference.call(request, caller.project_id))
        else:
            response = await state.workers.run(
                caller.project_id, lambda: graders.run_here(mapped, body.model_sample, item, timeout)
            )
        return response
    except BaseException as exc:  # refused (429), cancelled (the client left), or failed: on record too
        failure = exc.message if isinstance(exc, APIError) else f"{exc.__class__.__name__}: {exc}"
        raise
    finally:
        if state.audit is not None:  # what ran for whom, and its outcome (the sample is the caller's own)
            record = {
                "grader": body.grader,
                "model_sample": body.model_sample,
                "item": item,
                "reward": response.get("reward"),
                "errors": {k: v for k, v in (response.get("metadata") or {}).get("errors", {}).items() if v},
                "failed": failure,
            }
            limits = {
                "grader": AUDIT_GRADER_BYTES,
                "model_sample": AUDIT_DATA_BYTES,
                "item": AUDIT_DATA_BYTES,
            }
            record = bounded(record, limits)
            with CancelScope(shield=True):
                await to_thread.run_sync(
                    state.audit.append, caller.project_name, "grader.run", record, caller.key_id
                )
