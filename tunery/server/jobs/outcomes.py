"""What a training run makes of its job. While it runs: metrics events, the step and the estimated finish,
the hyperparameters `auto` resolved to, checkpoints. At its end: success (the model, the result file and
the events the run's summary calls for), a retry after the process died, or a failure with a message that
names none of the server's paths. Plain functions of the session; the scheduler calls them under its lock."""

from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tunery.run.files import CONFIG, FULL_VALID_PREFIX, STEP, TOTAL_STEPS, RunSummary, read_metrics
from tunery.server.catalog import checkpoint_name, fine_tuned_name, job_dir
from tunery.server.jobs.command import resolve_hyperparameters
from tunery.server.jobs.create import add_event
from tunery.server.jobs.processes import Proc
from tunery.server.jobs.reports import (
    CHECKPOINT_METRICS,
    checkpoint_steps,
    energy_message,
    finished_summary,
    metrics_message,
    results_csv,
    resume_point,
)
from tunery.server.settings import Settings
from tunery.server.store import Checkpoint, Event, File, Job, Project, new_id, now

DIED = "training_process_died"  # the error code of a job whose retries ran out: it can be resumed


def record_progress(
    session: Session, job: Job, proc: Proc, run_dir: Path, records: list[dict[str, Any]], steps: set[int]
) -> None:
    """New metrics `records` become `metrics` events, new checkpoint directories (`steps`) checkpoints."""
    project = session.get(Project, job.project_id)
    assert project is not None
    if job.hyperparameters.get("n_epochs") == "auto" or job.total_steps is None:
        resolve_hyperparameters(job, run_dir)
    for record in records:
        step = int(record.get(STEP, 0))
        proc.step_metrics.setdefault(step, {}).update(record)
        full = any(k.startswith(FULL_VALID_PREFIX) for k in record)
        if step <= job.last_step and not (full and not proc.full_seen):
            continue
        proc.full_seen = proc.full_seen or full
        job.last_step = max(job.last_step, step)
        if isinstance(record.get(TOTAL_STEPS), int):
            job.total_steps = record[TOTAL_STEPS]
        add_event(session, job.id, metrics_message(record), type="metrics", data=record)
    if job.total_steps and job.last_step > proc.start_step and job.status == "running":
        elapsed = time.monotonic() - proc.started
        per_step = elapsed / (job.last_step - proc.start_step)
        job.estimated_finish = now() + int(per_step * (job.total_steps - job.last_step))
    # the run's last step becomes the job's model (final/, named in succeed), so it is not announced as a
    # checkpoint while the process runs or once it has finished the run; a run that ended any other way (it
    # failed, or was paused at its last step) has it as a checkpoint
    finishing = proc.runner.poll() is None or finished_summary(run_dir) is not None
    model_step = job.total_steps if finishing else None
    sync_checkpoints(session, job, project, steps, proc.step_metrics, model_step)


def succeed(session: Session, settings: Settings, job: Job, run_dir: Path, summary: RunSummary) -> None:
    """The run has finished (final/ and summary.json): its model becomes the job's fine-tuned model."""
    project = session.get(Project, job.project_id)
    assert project is not None
    name = fine_tuned_name(job.base_model, project.name, job.suffix, job.model_key)
    # with a validation set final/ holds the best evaluation's weights (select_best), not the last step's
    final_step = summary.extra.get("final_step")
    step = int(final_step or summary.steps or job.total_steps or max(job.last_step, 0))
    metrics = {STEP: float(step)} | {
        k: v for k, v in summary.final_metrics.items() if k in CHECKPOINT_METRICS
    }
    records = read_metrics(run_dir)
    step_metrics: dict[int, dict[str, Any]] = {}
    for record in records:
        if isinstance(record.get(STEP), int):
            step_metrics.setdefault(record[STEP], {}).update(record)
    # checkpoints not seen yet (the last step's, when final/ holds an earlier step's weights) are named
    sync_checkpoints(session, job, project, checkpoint_steps(run_dir), step_metrics, step)
    # the model is a checkpoint of its own, under the model's name: never a checkpoint renamed, so
    # every name an event gave stays the name of the same checkpoint
    final = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.path == "run/final")
    )
    if final is None:
        final = new_checkpoint(job, step, metrics, name, "run/final")
        session.add(final)
    final.name, final.step_number, final.metrics = name, step, metrics
    result = _store_result_file(session, settings, job, base64.b64encode(results_csv(records).encode()))
    job.status, job.fine_tuned_model, job.finished_at = "succeeded", name, now()
    job.trained_tokens = summary.trained_tokens
    job.estimated_finish = None
    job.result_files = [result]
    add_event(session, job.id, f"New fine-tuned model created: {name}")
    if final_step and final_step != summary.steps:
        how = "stopped early" if summary.extra.get("stopped_early") else "trained"
        best = summary.extra.get("best_valid_loss", float("nan"))
        add_event(
            session,
            job.id,
            f"The model holds the weights of step {final_step}, its lowest validation loss "
            f"({best:.4f}); the job {how} to step {summary.steps}",
        )
    energy = energy_message(summary.energy)
    if energy:
        add_event(session, job.id, energy)
    for flag in summary.safety_flags:  # the tuned model is worse than its base (evals.json)
        add_event(session, job.id, f"Safety evaluation: {flag}", level="warn")
    add_event(session, job.id, "The job has successfully completed")


def sync_checkpoints(
    session: Session,
    job: Job,
    project: Project,
    steps: set[int],
    step_metrics: dict[int, dict[str, Any]],
    model_step: int | None,
) -> None:
    """The run's checkpoint directories (`steps`) as the job's checkpoints. Each is named once, when it
    is first seen, and its event gives that name; a name is never changed, so the event, the checkpoint
    list and the model lookup agree. The weights of `model_step` are the job's model (final/): that step
    gets the model's name at the end instead of a checkpoint name, as OpenAI's last checkpoint does.
    A directory the recipe rotated off disk (it keeps the newest few) marks its checkpoint deleted: the
    name then says it was removed (catalog.resolve) instead of that it never existed."""
    known = {
        c.step_number: c
        for c in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id))
        if c.path != "run/final"
    }
    for step in sorted(steps - set(known)):
        if step == model_step:
            continue
        name = checkpoint_name(job.base_model, project.name, job.suffix, new_id("", 8), step)
        metrics = {STEP: float(step)} | {
            k: v for k, v in step_metrics.get(step, {}).items() if k in CHECKPOINT_METRICS
        }
        session.add(new_checkpoint(job, step, metrics, name, f"run/checkpoints/step-{step}/model"))
        add_event(session, job.id, f"Checkpoint created at step {step} with Snapshot ID: {name}")
    for step, ckpt in known.items():
        if step not in steps and not ckpt.deleted:
            ckpt.deleted = True


def new_checkpoint(job: Job, step: int, metrics: dict[str, Any], name: str, path: str) -> Checkpoint:
    """A new checkpoint row of `job`: a run's checkpoint directory, or its final model."""
    return Checkpoint(
        id=new_id("ftckpt_"),
        job_id=job.id,
        project_id=job.project_id,
        step_number=step,
        created_at=now(),
        metrics=metrics,
        name=name,
        path=path,
    )


def _store_result_file(session: Session, settings: Settings, job: Job, content: bytes) -> str:
    file_id = new_id("file-")
    path = settings.files_dir / file_id
    tmp = path.with_name(f".tmp-{file_id}")
    tmp.write_bytes(content)
    os.replace(tmp, path)
    session.add(
        File(
            id=file_id,
            seq=int(session.scalar(select(func.max(File.seq))) or 0) + 1,
            project_id=job.project_id,
            filename="step_metrics.csv",
            purpose="fine-tune-results",
            bytes=len(content),
            created_at=now(),
        )
    )
    return file_id


def retry_or_fail(session: Session, settings: Settings, job: Job, cause: str) -> None:
    """The training process died (`cause`: "was killed by SIGKILL (out of memory?)"): queue the job again,
    ahead of the others, to continue from its last checkpoint; after `max_job_retries` retries, fail it
    with the cause (a resume by hand starts a new count)."""
    run_dir = job_dir(settings, job.id) / "run"
    earlier = deaths(session, job.id)
    limit = settings.max_job_retries
    job.pid, job.ray_job, job.estimated_finish = None, None, None
    if len(earlier) < limit:
        job.status = "queued"  # its queue_seq is older than the jobs queued since: it goes first
        add_event(
            session,
            job.id,
            f"The training process {cause}; retrying from {resume_point(run_dir)} "
            f"(retry {len(earlier) + 1} of {limit})",
            level="warn",
            data={"retry": len(earlier) + 1, "max_retries": limit, "cause": cause},
        )
        return
    died = len(earlier) + 1
    if died == 1:
        how = cause
    elif all(c == cause for c in earlier):
        how = f"{cause} {died} times"
    else:
        how = f"died {died} times; the last time it {cause}"
    steps = sorted(checkpoint_steps(run_dir))
    where = f"the last checkpoint is at step {steps[-1]}" if steps else "no checkpoint was saved"
    then = "Resume the job to try again." if resumable(settings, job) else "Create the job again to retry."
    fail(session, settings, job, DIED, f"Fine-tuning failed: the training process {how}; {where}. {then}")


def deaths(session: Session, job_id: str) -> list[str]:
    """How the job's training process died since it was last resumed by hand, oldest first. Each retry's
    event carries its cause, and a resume after the retries ran out starts the count over (`retry: 0`):
    the database, not the scheduler's memory, keeps the count, so it survives a restart."""
    causes: list[str] = []
    found = session.scalars(
        select(Event.data).where(Event.job_id == job_id, Event.type == "message").order_by(Event.seq.desc())
    )
    for data in found:
        if isinstance(data, dict) and "retry" in data:
            if not data["retry"]:
                break
            causes.append(str(data.get("cause") or "died"))
    return causes[::-1]


def resumable(settings: Settings, job: Job) -> bool:
    """The run has started (its config.yaml is written: `--resume` continues it) and its data is there."""
    directory = job_dir(settings, job.id)
    return (directory / "run" / CONFIG).is_file() and (directory / "training.jsonl").is_file()


def fail(
    session: Session, settings: Settings, job: Job, code: str, message: str, param: str | None = None
) -> None:
    message = public(settings, job, message)
    job.status, job.finished_at, job.estimated_finish, job.pid = "failed", now(), None, None
    job.ray_job = None
    job.error = {"code": code, "message": message, "param": param}
    add_event(session, job.id, message, level="error")


def public(settings: Settings, job: Job, message: str) -> str:
    """A message for the caller, without the server's paths: the job's files by their ids, its run
    directory as `run`, the data directory as DATA_DIR, the interpreter as `python`."""
    directory = job_dir(settings, job.id)
    names = {str(directory / "training.jsonl"): job.training_file, str(directory) + "/": ""}
    if job.validation_file:
        names[str(directory / "validation.jsonl")] = job.validation_file
    if job.parent_adapter:
        names[job.parent_adapter] = job.model
    names[job.local_model] = job.base_model  # when it is a path
    names[str(settings.data_dir)] = "DATA_DIR"
    python = Path(settings.python)
    prefixes = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    if python.parent.name == "bin":
        prefixes.add(str(python.parent.parent))
    names |= {prefix: "PYTHON_PREFIX" for prefix in prefixes}
    names |= {settings.python: "python", sys.executable: "python", str(Path.home()): "~"}
    # the longest first (a job's file before its directory, the interpreter before its prefix); a short
    # path (`/`, `/usr`, a user's home `/root`) says nothing, and replacing it would garble the message
    for path in sorted(names, key=len, reverse=True):
        if len(Path(path).parts) >= 3:
            message = message.replace(path, names[path])
    return message
