"""OpenAI's alpha grader endpoints: validate a grader, run one on a sample."""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter

from tunery.server import graders
from tunery.server.deps import Auth, State
from tunery.server.schemas import GraderRun, GraderValidate

router = APIRouter()


@router.post("/fine_tuning/alpha/graders/validate")
async def validate_grader(body: GraderValidate, state: State, caller: Auth) -> dict[str, Any]:
    mapped = graders.map_models(body.grader, state.settings)
    if graders.needs_model(body.grader):
        await state.inference.call({"op": "grade", "grader": mapped, "validate_only": True})
    else:
        await to_thread.run_sync(graders.parse_here, mapped)
    return {"grader": body.grader}


@router.post("/fine_tuning/alpha/graders/run")
async def run_grader(body: GraderRun, state: State, caller: Auth) -> dict[str, Any]:
    mapped = graders.map_models(body.grader, state.settings)
    item = body.item if body.item is not None else {}
    if body.item is None and body.reference_answer is not None:
        item = {"reference_answer": body.reference_answer}
    timeout = state.settings.grader_timeout
    if graders.needs_model(body.grader):
        request = {
            "op": "grade",
            "grader": mapped,
            "model_sample": body.model_sample,
            "item": item,
            "timeout": timeout,
        }
        result: dict[str, Any] = await state.inference.call(request)
        return result
    response: dict[str, Any] = await to_thread.run_sync(
        graders.run_here, mapped, body.model_sample, item, timeout
    )
    return response
