"""Who hears of a job's changes: the project's audit log and the serve console. Both watch the store
(`Store.watch`) rather than the code that makes the changes: a status is set in a dozen places, and a
watcher catches each one (and any added later) with its before and after. Both write after the commit,
so they hold only what the database does."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from tunery.run.files import is_held_out
from tunery.safety.audit import AuditLog
from tunery.server.jobs.command import RECIPES
from tunery.server.store import Event, Job, Project, Store, now

log = logging.getLogger("tunery.server")

# events that only restate the change they come with; any other event of the change says why it happened
PLAIN_EVENTS = (
    "Created fine-tuning job: ",
    "Files validated, moving job to queued state",
    "Fine-tuning job started",
    "Fine-tuning job paused",
    "Fine-tuning job cancelled",
)


# --- the audit log ----------------------------------------------------------------------------------------


def audit_job_changes(store: Store, audit: AuditLog) -> None:
    """Record every committed job creation, status change and event in the project's audit log. A route
    that acts for a key sets `session.info["audit_key_id"]`; otherwise the actor is the service (the
    scheduler).

    Per-step `metrics` events are not recorded (one per optimizer step; they stay in the job's
    metrics.jsonl and result file); metrics events with held-out scores (`valid_*`, `full_valid_*`) are.
    """
    projects: dict[str, str] = {}  # project id -> name (names never change)
    job_projects: dict[str, str] = {}  # job id -> project id

    def flushed(session: Session) -> list[tuple[str, str, dict[str, Any], str | None]]:
        records = []
        key_id = session.info.get("audit_key_id")
        for obj in session.new:
            if isinstance(obj, Job):
                job_projects[obj.id] = obj.project_id
                records.append((obj.id, "job.created", _created_payload(obj), key_id))
            elif isinstance(obj, Event) and (obj.type != "metrics" or _held_out(obj.data)):
                payload: dict[str, Any] = {
                    "job_id": obj.job_id,
                    "event_id": obj.id,
                    "level": obj.level,
                    "message": obj.message,
                }
                if obj.type == "metrics":
                    payload["data"] = obj.data
                records.append((obj.job_id, "job.event", payload, key_id))
        for obj in session.dirty:
            if isinstance(obj, Job):
                job_projects[obj.id] = obj.project_id
                history = inspect(obj).attrs.status.history
                if history.deleted and obj.status not in history.deleted:
                    change: dict[str, Any] = {"job_id": obj.id, "from": history.deleted[0], "to": obj.status}
                    if obj.status == "failed":
                        change["error"] = obj.error
                    if obj.status == "succeeded":
                        change["fine_tuned_model"] = obj.fine_tuned_model
                    records.append((obj.id, "job.status", change, key_id))
        return records

    def committed(records: list[tuple[str, str, dict[str, Any], str | None]]) -> None:
        for job_id, kind, payload, key_id in records:
            try:
                audit.append(_project_of(job_id), kind, payload, key_id)
            except Exception:  # the change is committed; a failed record must not fail the scheduler
                log.exception("audit log: could not record %s of %s", kind, job_id)

    def _project_of(job_id: str) -> str:
        project_id = job_projects.get(job_id)
        if project_id is None or project_id not in projects:
            with store.engine.connect() as connection:
                row = connection.execute(
                    select(Project.id, Project.name)
                    .join(Job, Job.project_id == Project.id)
                    .where(Job.id == job_id)
                ).one()
            project_id, projects[row[0]] = row[0], row[1]
            job_projects[job_id] = project_id
        if len(job_projects) > 100_000:
            job_projects.clear()
        return projects[project_id]

    store.watch(flushed, committed)


def _created_payload(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "model": job.model,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "method": job.method,
        "suffix": job.suffix,
        "seed": job.seed,
        "metadata": job.job_metadata,
        "status": job.status,
    }


def _held_out(data: dict[str, Any] | None) -> bool:
    return any(is_held_out(key) for key in data or {})


# --- the serve console ------------------------------------------------------------------------------------


def log_job_changes(store: Store) -> None:
    """One line on the serve console (the `tunery.server` logger) per committed job status change:

        job ftjob-abc (acme, sft on smollm2-135m-instruct) running
        job ftjob-abc (acme, sft on smollm2-135m-instruct) queued: The training process was killed by ...
        job ftjob-abc (acme, sft on smollm2-135m-instruct) succeeded in 4m12s: model ft:...
        job ftjob-abc (acme, sft on smollm2-135m-instruct) failed: the loss is NaN at step 2; ...

    The event that goes with a change, unless it only restates it, says why (a retry and its cause, a
    resume); it may be flushed after the change (an autoflush in between), so they are paired at the commit.
    """
    projects: dict[str, str] = {}  # project id -> name (names never change)

    def flushed(session: Session) -> list[JobChange | tuple[str, str, str]]:
        entries: list[JobChange | tuple[str, str, str]] = []
        for obj in list(session.new) + list(session.dirty):
            if not isinstance(obj, Job):
                continue
            if obj in session.new:
                before = None
            else:
                history = inspect(obj).attrs.status.history
                if not history.deleted or obj.status in history.deleted:
                    continue
                before = history.deleted[0]
            kind = obj.method.get("type", "") if isinstance(obj.method, dict) else ""
            change = JobChange(obj.id, obj.project_id, f"{RECIPES.get(kind, kind)} on {obj.base_model}")
            change.level, change.text = _change(obj, before)
            change.explained = obj.status in ("succeeded", "failed")  # their lines say it all
            entries.append(change)
        for obj in session.new:
            if isinstance(obj, Event) and obj.type == "message" and not obj.message.startswith(PLAIN_EVENTS):
                entries.append((obj.job_id, obj.message, obj.level))
        return entries

    def committed(entries: list[JobChange | tuple[str, str, str]]) -> None:
        changes: list[JobChange] = []
        latest: dict[str, JobChange] = {}  # job id -> its latest change so far
        for entry in entries:  # changes and events, in the order flushed
            if isinstance(entry, JobChange):
                changes.append(entry)
                latest[entry.job_id] = entry
                continue
            job_id, message, level = entry
            change = latest.get(job_id)
            if change is not None and not change.explained:  # the first event after a change
                change.text, change.explained = f"{change.text}: {message}", True
                if level == "warn":  # a retry after the training process died, as its event is
                    change.level = logging.WARNING
        for change in changes:
            try:
                if change.project_id not in projects:
                    with store.engine.connect() as connection:
                        name = connection.scalar(select(Project.name).where(Project.id == change.project_id))
                    projects[change.project_id] = str(name)
                project = projects[change.project_id]
                log.log(change.level, "job %s (%s, %s) %s", change.job_id, project, change.who, change.text)
            except Exception:  # the change is committed; a console line must not fail the scheduler
                log.exception("could not log a job status change")

    store.watch(flushed, committed)


@dataclass
class JobChange:
    """A job status change waiting for its commit to be logged."""

    job_id: str
    project_id: str
    who: str  # "sft on smollm2-135m-instruct"
    level: int = logging.INFO
    text: str = ""  # "running", "succeeded in 4m12s: model ...", then ": why" from its event
    explained: bool = False


def _change(job: Job, before: str | None) -> tuple[int, str]:
    """(log level, what happened) for a job's new status: "running", "failed: ...", "succeeded in 4m12s: ..."."""
    if job.status == "succeeded":
        took = (job.finished_at or now()) - (job.started_at or job.created_at)
        return logging.INFO, f"succeeded in {_duration(took)}: model {job.fine_tuned_model}"
    if job.status == "failed":
        message = (job.error or {}).get("message") or "no reason recorded"
        return logging.WARNING, f"failed: {message.removeprefix('Fine-tuning failed: ')}"
    words = {"validating_files": "validating files"}.get(job.status, job.status)
    return logging.INFO, words if before is not None else f"created, {words}"


def _duration(seconds: float) -> str:
    """4m12s, 12s, 1h03m."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
