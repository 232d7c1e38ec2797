"""The web app's own endpoints under /tunery/v1 (what OpenAI's API has no place for), and the web app.

    GET /tunery/v1/me                                      the key's project
    GET /tunery/v1/fine_tuning/jobs[?after=&limit=]        jobs, each with its `progress` (step / total)
    GET /tunery/v1/fine_tuning/jobs/{id}                   one job, with its `progress`
    GET /tunery/v1/fine_tuning/jobs/{id}/metrics?after=N   the step metrics logged since cursor N
    GET /tunery/v1/fine_tuning/jobs/{id}/events?type=      the newest events, of one type if asked
    GET /tunery/v1/fine_tuning/jobs/{id}/summary           the run's summary.json: energy, speed, memory
    GET /tunery/v1/fine_tuning/jobs/{id}/model_card        final/MODEL_CARD.md, as text/markdown
    GET /                                                  the web app (static files under /web/)

Same keys and the same project rule as /v1: another project's job is a 404.
"""

from __future__ import annotations

import json
import math
import mimetypes
import os
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import FileResponse, PlainTextResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from tunery.run.files import FINAL, read_summary_json
from tunery.server.auth import Caller
from tunery.server.catalog import job_dir
from tunery.server.deps import AnyRole, Auth, State
from tunery.server.errors import APIError, not_found
from tunery.server.schemas import cursor_page, event_object, job_object
from tunery.server.store import Event, Job

router = APIRouter()

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# summary.json keys that would show the server's paths or pids to a caller who only knows job ids
PRIVATE_SUMMARY_KEYS = ("run_dir", "pid")
# Only same-origin scripts, styles and requests: a model card or a chat answer that smuggles markup into
# the page still cannot load or run anything.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)
# the database's largest integer: a metrics cursor past it would fail the query (a 500), so it is a 400
MAX_CURSOR = 2**63 - 1


def _job(session: Session, caller: Caller, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.project_id != caller.project_id:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return job


def _with_progress(job: Job, caller: Caller) -> dict[str, Any]:
    """The OpenAI job object plus what the dashboard draws a progress bar from."""
    return job_object(job, caller.project_id) | {
        "progress": {
            "step": job.last_step if job.last_step >= 0 else None,
            "total_steps": job.total_steps,
            "started_at": job.started_at,
        }
    }


@router.get("/me")
async def me(caller: AnyRole) -> dict[str, Any]:
    return {
        "object": "tunery.caller",
        "project": caller.project_name,
        "project_id": caller.project_id,
        "key_id": caller.key_id,
        "role": caller.role,  # admin | labeller (a labeller's key only labels: the feedback studio)
        "name": caller.name,
    }


@router.get("/fine_tuning/jobs")
async def list_jobs(
    state: State, caller: Auth, after: str | None = None, limit: int = Query(50, ge=1, le=100)
) -> dict[str, Any]:
    with state.store.session() as session:
        query = select(Job).where(Job.project_id == caller.project_id)
        if after:
            query = query.where(Job.seq < _job(session, caller, after).seq)
        rows = list(session.scalars(query.order_by(Job.seq.desc()).limit(limit + 1)).all())
    return cursor_page([_with_progress(j, caller) for j in rows[:limit]], len(rows) > limit)


@router.get("/fine_tuning/jobs/{job_id}")
async def retrieve_job(state: State, caller: Auth, job_id: str) -> dict[str, Any]:
    with state.store.session() as session:
        return _with_progress(_job(session, caller, job_id), caller)


@router.get("/fine_tuning/jobs/{job_id}/metrics")
async def metrics(
    state: State,
    caller: Auth,
    job_id: str,
    after: int = Query(
        0, ge=0, le=MAX_CURSOR, description="`cursor` from the previous answer; 0 for the first call"
    ),
    limit: int = Query(5000, ge=1, le=20000),
) -> dict[str, Any]:
    """The records of the job's `metrics` events logged after `after`, oldest first, numbers only.

    A cursor rather than a step: the full-validation record of a run's last step arrives after the training
    record of that same step, and a poll between the two must still get it.
    """
    with state.store.session() as session:
        row = session.execute(
            select(Job.project_id, Job.last_step, Job.total_steps, Job.status).where(Job.id == job_id)
        ).first()
        if row is None or row[0] != caller.project_id:
            raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
        events = session.execute(
            select(Event.seq, Event.data)
            .where(Event.job_id == job_id, Event.type == "metrics", Event.seq > after)
            .order_by(Event.seq)
            .limit(limit + 1)
        ).all()
    shown = events[:limit]
    return {
        "object": "list",
        "data": [_numbers(data) for _, data in shown],
        "cursor": shown[-1][0] if shown else after,
        "has_more": len(events) > limit,
        "status": row[3],
        "last_step": row[1] if row[1] >= 0 else None,
        "total_steps": row[2],
    }


@router.get("/fine_tuning/jobs/{job_id}/events")
async def events(
    state: State,
    caller: Auth,
    job_id: str,
    type: Literal["message", "metrics"] | None = None,
    limit: int = Query(100, ge=1, le=1000),
) -> dict[str, Any]:
    """The newest events, like /v1's, but of one `type` if asked: a 300-step job has ~10 messages among
    300 metrics events, and the page lists the messages (the chart already shows the metrics)."""
    with state.store.session() as session:
        owner = session.scalar(select(Job.project_id).where(Job.id == job_id))
        if owner != caller.project_id:
            raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
        query = select(Event.id, Event.created_at, Event.level, Event.message, Event.type, Event.data).where(
            Event.job_id == job_id
        )
        if type is not None:
            query = query.where(Event.type == type)
        rows = session.execute(query.order_by(Event.seq.desc()).limit(limit + 1)).all()
    return cursor_page([event_object(r) for r in rows[:limit]], len(rows) > limit)


def _numbers(data: dict[str, Any] | None) -> dict[str, float | int]:
    # the chart plots numbers; anything else in a record (a flag, a nested dict) is only weight on the wire
    return {
        k: v
        for k, v in (data or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


@router.get("/fine_tuning/jobs/{job_id}/summary")
def summary(state: State, caller: Auth, job_id: str) -> dict[str, Any]:
    """What the run reported at its end (summary.json), else the energy measured up to the newest
    checkpoint, so a running job shows its energy so far."""
    with state.store.session() as session:
        job = _job(session, caller, job_id)
    run_dir = job_dir(state.settings, job.id) / "run"
    report = read_summary_json(run_dir)  # shown as the run wrote it, a method's own keys included
    if report is not None:
        shown = {k: v for k, v in report.items() if k not in PRIVATE_SUMMARY_KEYS}
        energy = report.get("energy")
        return {"object": "tunery.run_summary", "final": True, "summary": shown, "energy": energy}
    return {
        "object": "tunery.run_summary",
        "final": False,
        "summary": None,
        "energy": _energy_so_far(run_dir),
    }


def _energy_so_far(run_dir: Path) -> Any:
    """The energy counter in the newest checkpoint's state.json (a checkpoint's file, for resuming: not
    part of the run directory's contract)."""
    root = run_dir / "checkpoints"
    try:
        steps = [p for p in root.iterdir() if p.name.startswith("step-")]
    except OSError:
        return None
    for path in sorted(steps, key=_step_of, reverse=True):
        state = _read_json(path / "state.json")
        if isinstance(state, dict):
            return (state.get("counters") or {}).get("energy")
    return None


def _step_of(path: Path) -> int:
    tail = path.name.removeprefix("step-")
    return int(tail) if tail.isdigit() else -1


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@router.get("/fine_tuning/jobs/{job_id}/model_card", response_class=PlainTextResponse)
def model_card(state: State, caller: Auth, job_id: str) -> PlainTextResponse:
    with state.store.session() as session:
        job = _job(session, caller, job_id)
    run = job_dir(state.settings, job.id) / "run"
    try:
        text = (run / FINAL / "MODEL_CARD.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        when = "was deleted with the model" if job.model_deleted else "is written when the job succeeds"
        raise APIError(
            404, f"Job {job.id} has no model card: it {when}.", "fine_tuning_job_id", "model_card_not_found"
        ) from None
    for place in {str(run.resolve()), str(run)}:  # the card names its run directory: not the server's paths
        text = text.replace(place, f"jobs/{job.id}/run")
    return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")


# --- the web app ------------------------------------------------------------------------------------------


class WebFiles(StaticFiles):
    """The web app's files. `no-cache` means "revalidate": the browser keeps its copy and asks with its ETag,
    a 304 on an unchanged file, so an upgraded Tunery is never run with yesterday's scripts."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def mount_web(app: FastAPI) -> None:
    """The web app at / (index.html) and /web/ (its files): under their own prefix, so they never shadow an
    API path, and an unknown /v1 path stays OpenAI's 404 error object."""
    # ES modules need a JavaScript MIME type, and some systems' MIME tables map .js to text/plain
    mimetypes.add_type("text/javascript", ".js")
    mimetypes.add_type("text/javascript", ".mjs")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(
            WEB_DIR / "index.html",
            headers={
                "Cache-Control": "no-cache",
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    app.mount("/web", WebFiles(directory=WEB_DIR), name="web")
