"""Fine-tuning jobs: a scheduler thread in the server process that runs each job through the CLI a user
types, and turns what the run directory says into job statuses, events and checkpoints.

    validating_files   `python -m tunery data validate FILE --json ...` per file (one at a time), with
                       the data screen (personal data, offensive content) under the service's policies
    queued             waiting for a training slot (`max_running_jobs`, 1 by default), in queue order
    running            `python -m tunery train sft|dpo|grpo ... --out JOB/run` (or `--resume JOB/run`)
    succeeded | failed | cancelled | paused

Each job has a directory, JOB = DATA_DIR/jobs/<job id>: `training.jsonl` (and `validation.jsonl`,
`grader.json`) linked from the uploaded files when the job is created, so deleting a file never breaks
a job; `run/`, the recipe's run directory; `train.log` and `validate.log`.

Cancel sends SIGTERM, then SIGKILL after `stop_grace_seconds`. Pause sends SIGTERM: the recipe saves a
checkpoint at the next step boundary and exits; resume queues the job again and it continues with
`--resume JOB/run`. On shutdown running jobs get the same SIGTERM and stay `running` in the database;
on start, jobs found `running` (their process is stopped first if it outlived the server) go back to
the queue ahead of the others and resume from their last checkpoint.

No job is lost to a process death. A run with final/ and a readable summary.json has finished, whatever
its exit status. A training process killed by a signal the service did not send (the out-of-memory
killer's SIGKILL, a segfault, a stray SIGTERM), or found gone at start-up, is retried from its last
checkpoint, at most `max_job_retries` times; then the job fails with the cause and can be resumed by
hand. An ordinary error exit is deterministic and fails the job at once. Each retry is an event that
carries its cause (`data.cause`), so the count survives a restart.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from sqlalchemy import event, func, inspect, select
from sqlalchemy.orm import Session

from tunery.data.formats import PROBLEM_KEY, sniff_format
from tunery.errors import TuneryError
from tunery.safety.audit import AuditLog
from tunery.server.catalog import checkpoint_name, fine_tuned_name, job_dir
from tunery.server.errors import APIError
from tunery.server.settings import Settings
from tunery.server.store import Checkpoint, Event, File, Job, Project, Store, new_id, now

log = logging.getLogger("tunery.server")

# kto and reward_model are Tunery's own method types: the feedback studio creates them (routes/feedback.py)
RECIPES = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo", "kto": "kto", "reward_model": "rm"}
FILE_FORMATS = {
    "supervised": "chat",
    "dpo": "preference",
    "reinforcement": "prompts",
    "kto": "unpaired",
    "reward_model": "preference",
}
FORMAT_NAMES = {
    "chat": "fine-tune-chat",
    "preference": "fine-tune-preference",
    "unpaired": "unpaired-feedback",
}
TERMINAL = ("succeeded", "failed", "cancelled")
DIED = "training_process_died"  # the error code of a job whose retries ran out: it can be resumed
SCREENING_KEYS = ("personal_data", "offensive_content")  # `data validate --screen-*` problems
MIN_TRAINING_EXAMPLES = 10
VALIDATIONS_AT_ONCE = 2  # file checks running at once, of different projects
METRIC_NAMES = {  # metric -> how the event message says it
    "train_loss": "training loss",
    "valid_loss": "validation loss",
    "full_valid_loss": "full validation loss",
    "train_reward_mean": "train mean reward",
    "valid_reward_mean": "validation mean reward",
    "train_mean_token_accuracy": "training accuracy",
}
CHECKPOINT_METRICS = (
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
    "train_reward_mean",
    "valid_reward_mean",
)


def add_event(
    session: Session,
    job_id: str,
    message: str,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    session.add(
        Event(
            id=new_id("ftevent-"),
            job_id=job_id,
            created_at=now(),
            level=level,
            message=message,
            type=type,
            data=data,
        )
    )


def next_queue_seq(session: Session) -> int:
    return int(session.scalar(select(func.max(Job.queue_seq))) or 0) + 1


# --- commands ---------------------------------------------------------------------------------------------


def validate_command(settings: Settings, job: Job, path: Path, param: str) -> list[str]:
    kind = job.method["type"]
    minimum = MIN_TRAINING_EXAMPLES if param == "training_file" else 1
    command = [settings.python, *settings.cli, "data", "validate", str(path), "--json"]
    # chat and preference files are detected, so a file of the wrong kind gets OpenAI's format message
    file_format = "prompts" if kind == "reinforcement" else "auto"
    command += ["--model", job.local_model, "--format", file_format, "--min-examples", str(minimum)]
    max_length = _override(settings, "max_length")
    if max_length is not None:
        command += ["--max-length", str(max_length)]
    command += ["--screen-content", settings.screen_content, "--screen-pii", settings.screen_pii]
    return command + ["--max-bytes", str(settings.max_upload_bytes)]


def _override(settings: Settings, name: str) -> str | None:
    for pair in settings.train_overrides:
        key, _, value = pair.partition("=")
        if key.strip().replace("-", "_") == name:
            return value.strip()
    return None


def train_command(settings: Settings, job: Job) -> list[str]:
    """The `tunery train` command of a job: a fresh start, or `--resume` once the run has a config."""
    kind = job.method["type"]
    directory = job_dir(settings, job.id)
    run_dir = directory / "run"
    command = [settings.python, *settings.cli, "train", RECIPES[kind]]
    if (run_dir / "config.yaml").is_file():
        return command + ["--resume", str(run_dir)]
    command += ["--model", job.local_model, "--data", str(directory / "training.jsonl")]
    command += ["--out", str(run_dir), "--overwrite", "--seed", str(job.seed)]
    if job.validation_file:
        command += ["--valid", str(directory / "validation.jsonl")]
    hp = job.method.get(kind, {}).get("hyperparameters") or {}
    flags = {
        "n_epochs": "--epochs",
        "batch_size": "--batch-size",
        "learning_rate_multiplier": "--lr-multiplier",
    }
    for name, flag in flags.items():
        if hp.get(name, "auto") != "auto":
            command += [flag, str(hp[name])]
    if job.parent_adapter:
        command += ["--adapter", job.parent_adapter]
    if kind in ("dpo", "kto") and hp.get("beta", "auto") != "auto":
        command += ["--beta", str(hp["beta"])]
    # the recipe screens again (and writes the redacted copy under `redact`) with the service's policies
    for name in ("screen_content", "screen_pii"):
        command += ["--set", f"{name}={getattr(settings, name)}"]
    if kind == "reinforcement":
        command += ["--grader", str(directory / "grader.json")]
        if hp.get("eval_interval", "auto") != "auto":
            command += ["--eval-every", str(hp["eval_interval"])]
        if hp.get("eval_samples", "auto") != "auto":
            command += ["--set", f"eval_examples={hp['eval_samples']}"]
    for pair in settings.train_overrides:
        command += ["--set", pair]
    return command


# --- reading what the CLI wrote ---------------------------------------------------------------------------


def validation_error(
    report: dict[str, Any], param: str, file_id: str, kind: str, foreign: str | None = None
) -> dict[str, Any] | None:
    """The job's `error` for a `tunery data validate --json` report, or None when the file is usable.
    `foreign` is `foreign_format`'s message for a file in a format Tunery does not read."""
    label = "training" if param == "training_file" else "validation"
    expected = FILE_FORMATS[kind]
    found = report.get("format")
    problems = report.get("problems", [])
    if foreign is None:  # the check's own message, should the file have gone since
        foreign = next(
            (f"line {p['line']}: {p['message']}" for p in problems if p.get("key") == PROBLEM_KEY), None
        )
    if foreign is not None:
        return {
            "code": f"invalid_{label}_file",
            "message": f"The job failed due to an invalid {label} file. Input file {file_id}, {foreign}",
            "param": param,
        }
    if found != expected and expected != "prompts":
        return {
            "code": f"invalid_{label}_file",
            "message": (
                f"The job failed due to an invalid {label} file. Input file {file_id} is in the "
                f"{FORMAT_NAMES.get(str(found), str(found))} format, but the specified fine-tuning job is not "
                f"using '{_method_for(str(found))}' as the training method (provided method={kind})."
            ),
            "param": param,
        }
    errors = [p for p in report.get("problems", []) if p.get("severity") == "error"]
    if not errors:
        return None
    if all(p.get("key") in SCREENING_KEYS for p in errors):
        found = "; ".join(str(p["message"]) for p in errors)
        return {
            "code": f"invalid_{label}_file",
            "message": (
                f"The job failed due to an invalid {label} file. This {label} file was blocked by data "
                f"screening: {found}. Remove those lines or mask the personal data (`tunery data screen "
                "FILE --pii redact` writes a masked copy), then upload the file again."
            ),
            "param": param,
        }
    if all(p.get("key") == "invalid_n_examples" for p in errors):
        message = errors[0]["message"]
        return {
            "code": "invalid_n_examples",
            "message": f"{label.capitalize()} file has {message}",
            "param": param,
        }
    shown = "; ".join(
        (f"line {p['line']}: " if p.get("line") else "") + f"{p['message']} [{p['key']}]" for p in errors[:5]
    )
    more = f" (and {len(errors) - 5} more errors)" if len(errors) > 5 else ""
    return {
        "code": f"invalid_{label}_file",
        "message": f"The job failed due to an invalid {label} file. Invalid file format. {shown}{more}",
        "param": param,
    }


def screening_warnings(report: dict[str, Any], param: str, file_id: str, settings: Settings) -> list[str]:
    """Job event messages for what data screening found but let through (policy warn or redact)."""
    label = "Training" if param == "training_file" else "Validation"
    outcomes = {
        ("personal_data", "redact"): "it is masked in the copy the job trains on",
        ("offensive_content", "redact"): "those lines are left out of the copy the job trains on",
    }
    messages = []
    for p in report.get("problems", []):
        if p.get("key") in SCREENING_KEYS and p.get("severity") == "warning":
            policy = settings.screen_pii if p["key"] == "personal_data" else settings.screen_content
            outcome = outcomes.get((p["key"], policy), "the job continues")
            messages.append(f"{label} file {file_id}: data screening found {p['message']}; {outcome}")
    return messages


def foreign_format(report: dict[str, Any], path: Path, filename: str, kind: str) -> str | None:
    """For a file the check found in a foreign format (a CSV, a JSON array, legacy prompt/completion...):
    what it looks like, what the job's method reads, and the convert command naming the uploaded file."""
    if not any(p.get("key") == PROBLEM_KEY for p in report.get("problems", [])):
        return None
    try:
        found = sniff_format(path, name=filename)
    except TuneryError:
        return None
    return None if found is None else f"line {found.line}: {found.message(FILE_FORMATS[kind])}"


def _method_for(file_format: str) -> str:
    return {"chat": "supervised", "preference": "dpo", "unpaired": "kto"}.get(file_format, file_format)


def tail_error(log_path: Path, exit_code: int, offset: int = 0, process: str = "the training process") -> str:
    """What went wrong, from a finished command's log: the CLI's `tunery: error:` message, else the last
    line (an exception's one-line summary), never a whole traceback. The log is appended to by every
    attempt: only what this one wrote, from `offset` on, is read."""
    try:
        with log_path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        text = ""
    marker = "tunery: error: "
    if marker in text:
        return text.rsplit(marker, 1)[1].strip()[:2000]
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1].strip()[:500] if lines else "no output"
    how = death_cause(exit_code) or f"exited with status {exit_code}"
    return f"{process} {how}: {last}"


def death_cause(exit_code: int) -> str | None:
    """How a process was killed, from its exit status (negative from Popen, 128 + N from a shell), or None
    for an ordinary exit. SIGKILL from nobody we know of is most often the out-of-memory killer."""
    number = -exit_code if exit_code < 0 else exit_code - 128
    if not 0 < number < signal.NSIG:
        return None
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    return f"was killed by {name}" + (" (out of memory?)" if number == signal.SIGKILL else "")


def stop_cause(error: str) -> str | None:
    """The recipes catch SIGTERM and SIGINT, save a checkpoint and exit with `stopped at step N/M (SIGTERM);
    continue with: ...` (training/common.py): when the service did not send it, the run was stopped by
    someone else (a system shutdown, an eviction) and continues like a killed one."""
    found = re.match(r"stopped at step \d+/\d+ \((\w+)\)", error)
    return f"was stopped by {found[1]} (not sent by the service)" if found else None


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that has finished, or None. A recipe writes final/ (atomically) and then
    summary.json at its very end, so with both the model is complete whatever the exit status (a kill
    during the model card or exit); a summary.json that does not parse is not an end."""
    if not (run_dir / "final").is_dir():
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def metrics_message(record: dict[str, Any]) -> str:
    step, total = record.get("step"), record.get("total_steps")
    head = f"Step {step}/{total}" if total else f"Step {step}"
    parts = [
        f"{label}={record[key]:.4f}"
        for key, label in METRIC_NAMES.items()
        if isinstance(record.get(key), float | int)
    ]
    return head + (": " + ", ".join(parts) if parts else "")


def energy_message(energy: Any) -> str | None:
    """The run's energy as an event: its numbers are estimates on most machines, so the method goes along."""
    if not isinstance(energy, dict):
        return None  # tracking was off
    if "kwh" not in energy:
        return f"Energy not measured: {energy.get('error', 'no reading')}"
    kwh, kg = energy["kwh"], energy["kg_co2e"]
    amount = f"{kwh:.2g} kWh" if kwh >= 1e-3 else f"{kwh * 1e3:.2g} Wh"  # a short job uses a few Wh
    amount += f", {kg:.2g} kg CO2e" if kg >= 1e-3 else f", {kg * 1e3:.2g} g CO2e"
    where = energy.get("country", "?")
    return f"Energy: {amount} ({energy.get('method', 'method not recorded')}; grid: {where})"


def results_csv(records: list[dict[str, Any]]) -> str:
    lines = ["step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"]
    for r in records:
        values = [
            r.get("train_loss"),
            r.get("train_mean_token_accuracy"),
            r.get("valid_loss"),
            r.get("valid_mean_token_accuracy"),
        ]
        if all(v is None for v in values):
            continue
        lines.append(",".join([str(r.get("step", ""))] + ["" if v is None else f"{v:.6g}" for v in values]))
    return "\n".join(lines) + "\n"


# --- audit ----------------------------------------------------------------------------------------------


def audit_job_changes(store: Store, audit: AuditLog) -> None:
    """Record every committed job creation, status change and event in the project's audit log.

    It listens to the store's sessions rather than to `add_event` callers: a status is set in a dozen
    places, and a listener catches each one (and any added later) with its before and after. Records are
    written after the commit, so the log holds only what the database does. A route that acts for a key
    sets `session.info["audit_key_id"]`; otherwise the actor is the service (the scheduler).

    Per-step `metrics` events are not recorded (one per optimizer step; they stay in the job's
    metrics.jsonl and result file); metrics events with held-out scores (`valid_*`, `full_valid_*`) are.
    """
    projects: dict[str, str] = {}  # project id -> name (names never change)
    job_projects: dict[str, str] = {}  # job id -> project id

    def after_flush(session: Session, _context: Any) -> None:
        pending = session.info.setdefault("audit", [])
        key_id = session.info.get("audit_key_id")
        for obj in session.new:
            if isinstance(obj, Job):
                job_projects[obj.id] = obj.project_id
                pending.append((obj.id, "job.created", _created_payload(obj), key_id))
            elif isinstance(obj, Event) and (obj.type != "metrics" or _held_out(obj.data)):
                payload: dict[str, Any] = {
                    "job_id": obj.job_id,
                    "event_id": obj.id,
                    "level": obj.level,
                    "message": obj.message,
                }
                if obj.type == "metrics":
                    payload["data"] = obj.data
                pending.append((obj.job_id, "job.event", payload, key_id))
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
                    pending.append((obj.id, "job.status", change, key_id))

    def after_commit(session: Session) -> None:
        for job_id, kind, payload, key_id in session.info.pop("audit", []):
            try:
                audit.append(_project_of(job_id), kind, payload, key_id)
            except Exception:  # the change is committed; a failed record must not fail the scheduler
                log.exception("audit log: could not record %s of %s", kind, job_id)

    def after_rollback(session: Session, _transaction: Any) -> None:
        session.info.pop("audit", None)

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

    sessions = store._sessions
    event.listen(sessions, "after_flush", after_flush)
    event.listen(sessions, "after_commit", after_commit)
    event.listen(sessions, "after_soft_rollback", after_rollback)


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
    return any(key.startswith(("valid_", "full_valid_")) for key in data or {})


# --- the serve console ----------------------------------------------------------------------------------

# events that only restate the change they come with; any other event of the change says why it happened
PLAIN_EVENTS = (
    "Created fine-tuning job: ",
    "Files validated, moving job to queued state",
    "Fine-tuning job started",
    "Fine-tuning job paused",
    "Fine-tuning job cancelled",
)


def log_job_changes(store: Store) -> None:
    """One line on the serve console (the `tunery.server` logger) per committed job status change:

        job ftjob-abc (acme, sft on smollm2-135m-instruct) running
        job ftjob-abc (acme, sft on smollm2-135m-instruct) queued: The training process was killed by ...
        job ftjob-abc (acme, sft on smollm2-135m-instruct) succeeded in 4m12s: model ft:...
        job ftjob-abc (acme, sft on smollm2-135m-instruct) failed: the loss is NaN at step 2; ...

    Like the audit log it listens to the store's sessions, the one place that sees every status change
    (a status is set in a dozen places), and writes after the commit, so only what happened is logged.
    The event that goes with a change, unless it only restates it, says why (a retry and its cause, a
    resume); it may be flushed after the change (an autoflush in between), so they are paired at the commit.
    """
    projects: dict[str, str] = {}  # project id -> name (names never change)

    def after_flush(session: Session, _context: Any) -> None:
        pending = session.info.setdefault("console", [])
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
            pending.append(change)
        for obj in session.new:
            if isinstance(obj, Event) and obj.type == "message" and not obj.message.startswith(PLAIN_EVENTS):
                pending.append((obj.job_id, obj.message, obj.level))

    def after_commit(session: Session) -> None:
        changes: list[JobChange] = []
        latest: dict[str, JobChange] = {}  # job id -> its latest change so far
        for entry in session.info.pop("console", []):  # changes and events, in the order flushed
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

    def after_rollback(session: Session, _transaction: Any) -> None:
        session.info.pop("console", None)

    sessions = store._sessions
    event.listen(sessions, "after_flush", after_flush)
    event.listen(sessions, "after_commit", after_commit)
    event.listen(sessions, "after_soft_rollback", after_rollback)


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


def _checkpoint(job: Job, step: int, metrics: dict[str, Any], name: str, path: str) -> Checkpoint:
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


# --- the scheduler ----------------------------------------------------------------------------------------


@dataclass
class Proc:
    """A command the scheduler started for a job."""

    job_id: str
    kind: str  # "validate" | "train"
    popen: subprocess.Popen[bytes]
    log: IO[bytes]
    log_offset: int = 0  # where this attempt's output starts in the log (earlier attempts' comes before)
    project: str = ""  # the job's project id: training slots are shared between projects in turn
    started: float = field(default_factory=time.monotonic)
    stop_reason: str | None = None  # "cancel" | "pause" | "shutdown" | "turn": why we signalled it
    kill_at: float | None = None  # SIGKILL then, unless it has exited
    # validation: files still to check after this one, as (param, file id, path)
    pending: list[tuple[str, str, Path]] = field(default_factory=list)
    current: tuple[str, str, Path] | None = None
    out_path: Path | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # reports of the files checked so far
    # training: what has been read from metrics.jsonl
    offset: int = 0
    start_step: int = 0
    full_seen: bool = False
    step_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)


class Scheduler:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store, self.settings = store, settings
        log_job_changes(store)  # a line on the serve console per status change, whoever makes it
        self.lock = threading.RLock()  # every status change happens under it (API threads and the loop)
        self.procs: dict[tuple[str, str], Proc] = {}  # (job id, kind) -> process
        self._turns: dict[str, float] = {}  # project id -> when its last training process started
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        for path in (self.settings.files_dir, self.settings.jobs_dir, self.settings.logs_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="tunery-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; running jobs checkpoint and stop, and stay `running` to resume on next start."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self.lock:
            for proc in self.procs.values():
                if proc.popen.poll() is None:
                    proc.stop_reason = proc.stop_reason or "shutdown"  # validation reruns on the next start
                    if proc.kind == "train":
                        self._signal(proc, signal.SIGTERM)
                    else:
                        self._signal(proc, signal.SIGKILL)
            deadline = time.monotonic() + self.settings.stop_grace_seconds
            for proc in self.procs.values():
                try:
                    proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.popen.wait()
            self._tick()  # record what the stopped processes left (a finished job, the last metrics)
            for proc in self.procs.values():
                proc.log.close()
            self.procs.clear()

    def wake(self) -> None:
        self._wake.set()

    def recover(self) -> None:
        """Jobs the last server left running go back to the queue, first in line, to resume. A process
        found gone (the server and its job both died, or the machine restarted) counts as a retry: a job
        that takes the machine down with it is not retried forever."""
        with self.lock, self.store.session() as session:
            for job in session.scalars(select(Job).where(Job.status.in_(("running", "paused", "cancelled")))):
                died = False
                if job.pid is not None:
                    died = not _stop_orphan(job.pid, job.id, self.settings.stop_grace_seconds)
                    job.pid = None
                if job.status != "running":
                    continue
                run_dir = job_dir(self.settings, job.id) / "run"
                if not (job_dir(self.settings, job.id) / "training.jsonl").is_file():
                    self._fail(
                        session,
                        job,
                        "job_interrupted",
                        "The service restarted and the job's data directory is gone; it cannot be resumed.",
                    )
                    continue
                summary = finished_summary(run_dir)
                if summary is not None:  # it finished while the service was down
                    self._succeed(session, job, run_dir, summary)
                elif died:
                    self._retry_or_fail(session, job, "ended while the service was down")
                else:
                    job.status = "queued"
                    where = _resume_point(run_dir)
                    add_event(session, job.id, f"The service restarted; the job will resume from {where}")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                with self.lock:
                    self._tick()
            except Exception:  # the loop must survive anything one job does
                log.exception("scheduler tick failed")
            self._wake.wait(self.settings.poll_seconds)
            self._wake.clear()

    def _tick(self) -> None:
        for key, proc in list(self.procs.items()):
            code = proc.popen.poll()
            if proc.kind == "train":
                self._read_run(proc)
            if code is not None:
                del self.procs[key]
                proc.log.close()
                if proc.kind == "train":
                    self._finished_training(proc, code)
                else:
                    self._finished_validation(proc, code)
            elif proc.kill_at is not None and time.monotonic() >= proc.kill_at:
                self._signal(proc, signal.SIGKILL)
                proc.kill_at = None
        if self._stopping.is_set():
            return
        self._start_validations()
        self._start_training()

    # --- actions from the API (under the lock) ---------------------------------------------------------

    def cancel(self, session: Session, job: Job) -> None:
        if job.status in TERMINAL:
            raise APIError(
                400,
                f"Job {job.id} has already {_past(job.status)} and cannot be cancelled.",
                code="job_not_cancellable",
            )
        job.status, job.finished_at, job.estimated_finish = "cancelled", now(), None
        add_event(session, job.id, "Fine-tuning job cancelled")
        for kind in ("validate", "train"):
            proc = self.procs.get((job.id, kind))
            if proc is not None and proc.popen.poll() is None:
                proc.stop_reason = "cancel"
                self._terminate(proc, graceful=kind == "train")
        self.wake()

    def pause(self, session: Session, job: Job) -> None:
        if job.status not in ("running", "queued", "validating_files"):
            raise APIError(
                400,
                f"Job {job.id} is {job.status}; only running or queued jobs can be paused.",
                code="job_not_pausable",
            )
        proc = self.procs.get((job.id, "train"))
        if job.status == "running" and proc is not None and proc.popen.poll() is None:
            proc.stop_reason = "pause"
            self._terminate(proc, graceful=True)
            add_event(
                session, job.id, "Pausing the job: a checkpoint is saved at the end of the current step"
            )
        else:
            validating = self.procs.get((job.id, "validate"))
            if validating is not None:
                validating.stop_reason = "pause"
                self._terminate(validating, graceful=False)
            add_event(session, job.id, "Fine-tuning job paused")
        job.status, job.estimated_finish = "paused", None
        self.wake()

    def resume(self, session: Session, job: Job) -> None:
        """A paused job, or a failed one whose training process kept dying (with a fresh count of retries)."""
        if job.status == "failed" and (job.error or {}).get("code") == DIED and self._resumable(job):
            run_dir = job_dir(self.settings, job.id) / "run"
            job.status, job.error, job.finished_at = "queued", None, None
            job.queue_seq = next_queue_seq(session)
            add_event(
                session,
                job.id,
                f"Fine-tuning job resumed after its training process died; it continues from "
                f"{_resume_point(run_dir)}",
                data={"retry": 0},  # the retries start over (_deaths)
            )
            self.wake()
            return
        if job.status != "paused":
            raise APIError(
                400,
                f"Job {job.id} is {job.status}; only paused jobs, and failed jobs whose training process "
                "died after it had started the run, can be resumed.",
                code="job_not_paused",
            )
        job.status = "queued" if job.stats is not None else "validating_files"
        job.queue_seq = next_queue_seq(session)
        add_event(session, job.id, "Fine-tuning job resumed; it continues from its last checkpoint")
        self.wake()

    def _resumable(self, job: Job) -> bool:
        """The run has started (its config.yaml is written: `--resume` continues it) and its data is there."""
        directory = job_dir(self.settings, job.id)
        return (directory / "run" / "config.yaml").is_file() and (directory / "training.jsonl").is_file()

    # --- validation -------------------------------------------------------------------------------------

    def _start_validations(self) -> None:
        """File checks, VALIDATIONS_AT_ONCE at a time and one a project: a project's huge file (checking
        512 MB takes many minutes) never holds up another project's."""
        checking = [p for p in self.procs.values() if p.kind == "validate"]
        if len(checking) >= VALIDATIONS_AT_ONCE:
            return
        busy = {p.project for p in checking}
        with self.store.session() as session:
            for job in session.scalars(select(Job).where(Job.status == "validating_files").order_by(Job.seq)):
                if job.project_id in busy or (job.id, "validate") in self.procs:
                    continue
                directory = job_dir(self.settings, job.id)
                files = [("training_file", job.training_file, directory / "training.jsonl")]
                if job.validation_file:
                    files.append(("validation_file", job.validation_file, directory / "validation.jsonl"))
                names = " and validation file: ".join(f for _, f, _ in files)
                add_event(session, job.id, f"Validating training file: {names}")
                self._spawn_validation(job, files, {})
                busy.add(job.project_id)
                if len(busy) >= VALIDATIONS_AT_ONCE:
                    return

    def _spawn_validation(self, job: Job, files: list[tuple[str, str, Path]], stats: dict[str, Any]) -> None:
        current, pending = files[0], files[1:]
        directory = job_dir(self.settings, job.id)
        out_path = directory / f"validate-{current[0]}.json"
        command = validate_command(self.settings, job, current[2], current[0])
        log_file = (directory / "validate.log").open("ab")
        log_offset = os.fstat(log_file.fileno()).st_size
        with out_path.open("wb") as out:
            popen = subprocess.Popen(
                command, stdout=out, stderr=log_file, cwd=directory, env=self._env(), start_new_session=True
            )
        self.procs[(job.id, "validate")] = Proc(
            job.id,
            "validate",
            popen,
            log_file,
            log_offset=log_offset,
            project=job.project_id,
            pending=pending,
            current=current,
            out_path=out_path,
            stats=stats,
        )

    def _finished_validation(self, proc: Proc, code: int) -> None:
        assert proc.current is not None and proc.out_path is not None
        param, file_id, path = proc.current
        with self.store.session() as session:
            job = session.get(Job, proc.job_id)
            if job is None or job.status != "validating_files" or proc.stop_reason:
                return
            try:
                report = json.loads(proc.out_path.read_text())
            except (OSError, ValueError):
                report = None
            error: dict[str, Any] | None
            if code not in (0, 1) or not isinstance(report, dict):
                label = "training" if param == "training_file" else "validation"
                log_path = job_dir(self.settings, job.id) / "validate.log"
                message = tail_error(log_path, code, proc.log_offset, process="The file check")
                error = {
                    "code": f"invalid_{label}_file",
                    "message": f"The job failed due to an invalid {label} file. {message}",
                    "param": param,
                }
            else:
                upload = session.get(File, file_id)
                name = upload.filename if upload is not None else file_id
                foreign = foreign_format(report, path, name, job.method["type"])
                error = validation_error(report, param, file_id, job.method["type"], foreign)
            if error is not None:
                self._fail(session, job, error["code"], error["message"], error["param"])
                return
            checked = report if isinstance(report, dict) else {}
            for message in screening_warnings(checked, param, file_id, self.settings):
                add_event(session, job.id, message, level="warn")
            stats = proc.stats | {param: report["stats"] if isinstance(report, dict) else {}}
            if proc.pending:
                self._spawn_validation(job, proc.pending, stats)
                return
            job.stats = stats
            job.status, job.queue_seq = "queued", next_queue_seq(session)
            add_event(session, job.id, "Files validated, moving job to queued state")
        self.wake()

    # --- training ---------------------------------------------------------------------------------------

    def _start_training(self) -> None:
        """Start queued jobs while there are free slots. Projects take turns: a project with no job running
        goes first, then the one whose job started least recently; a project's own jobs keep their queue
        order. With every slot busy, a job that has trained for its turn gives its slot up (`_take_turns`)."""
        training = [p for p in self.procs.values() if p.kind == "train"]
        with self.store.session() as session:
            queued = [
                job
                for job in session.scalars(
                    select(Job).where(Job.status == "queued").order_by(Job.queue_seq, Job.seq)
                )
                if (job.id, "train") not in self.procs  # a paused process still checkpointing
            ]
            if not queued:
                return
            if len(training) >= self.settings.max_running_jobs:
                self._take_turns(session, training, queued)
                return
            busy = {p.project for p in training}
            queued.sort(key=lambda job: (job.project_id in busy, self._turns.get(job.project_id, 0.0)))
            for job in queued[: self.settings.max_running_jobs - len(training)]:
                self._spawn_training(session, job)

    def _take_turns(self, session: Session, training: list[Proc], queued: list[Job]) -> None:
        """A job that has trained for `job_turn_minutes` while another project's job waits is stopped at its
        next step boundary (it checkpoints, as on pause) and queued again; it continues
        from that checkpoint when its project's turn comes. One job at a time, the one that has run longest."""
        turn = self.settings.job_turn_minutes * 60
        if turn <= 0:
            return
        waiting = {job.project_id for job in queued}
        due = [
            p
            for p in training
            if p.stop_reason is None and waiting - {p.project} and time.monotonic() - p.started >= turn
        ]
        if not due or any(p.stop_reason == "turn" for p in training):
            return
        proc = min(due, key=lambda p: p.started)
        proc.stop_reason = "turn"
        self._terminate(proc, graceful=True)
        add_event(
            session,
            proc.job_id,
            f"Another project's job is waiting: this job gives up its training slot after "
            f"{self.settings.job_turn_minutes:g} minutes, at the end of the current step, and continues from "
            "there when its turn comes",
        )

    def _spawn_training(self, session: Session, job: Job) -> None:
        directory = job_dir(self.settings, job.id)
        run_dir = directory / "run"
        command = train_command(self.settings, job)
        resuming = "--resume" in command
        log_file = (directory / "train.log").open("ab")
        log_file.write(f"\n$ {' '.join(command)}\n".encode())
        log_file.flush()
        log_offset = os.fstat(log_file.fileno()).st_size  # after the command line: an error never quotes it
        popen = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=directory,
            env=self._env(),
            start_new_session=True,
        )
        steps = sorted(_checkpoint_steps(run_dir)) if resuming else []
        start_step = steps[-1] if steps else 0
        proc = Proc(
            job.id, "train", popen, log_file, log_offset, start_step=start_step, project=job.project_id
        )
        self._turns[job.project_id] = time.monotonic()
        self.procs[(job.id, "train")] = proc
        job.status, job.pid = "running", popen.pid
        job.started_at = job.started_at or now()
        job.attempts += 1
        if resuming:
            add_event(
                session,
                job.id,
                f"Fine-tuning job resumed from step {proc.start_step}"
                if steps
                else "Fine-tuning job restarted",
            )
        else:
            add_event(session, job.id, "Fine-tuning job started")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _read_run(self, proc: Proc) -> None:
        """New metrics records become `metrics` events, new checkpoint directories become checkpoints."""
        run_dir = job_dir(self.settings, proc.job_id) / "run"
        records = _read_new_records(run_dir / "metrics.jsonl", proc)
        steps = _checkpoint_steps(run_dir)
        if not records and not steps:
            return
        with self.store.session() as session:
            job = session.get(Job, proc.job_id)
            if job is None:
                return
            project = session.get(Project, job.project_id)
            if job.hyperparameters.get("n_epochs") == "auto" or job.total_steps is None:
                self._resolve_hyperparameters(job, run_dir)
            for record in records:
                step = int(record.get("step", 0))
                proc.step_metrics.setdefault(step, {}).update(record)
                full = any(k.startswith("full_") for k in record)
                if step <= job.last_step and not (full and not proc.full_seen):
                    continue
                proc.full_seen = proc.full_seen or full
                job.last_step = max(job.last_step, step)
                if isinstance(record.get("total_steps"), int):
                    job.total_steps = record["total_steps"]
                add_event(session, job.id, metrics_message(record), type="metrics", data=record)
            if job.total_steps and job.last_step > proc.start_step and job.status == "running":
                elapsed = time.monotonic() - proc.started
                per_step = elapsed / (job.last_step - proc.start_step)
                job.estimated_finish = now() + int(per_step * (job.total_steps - job.last_step))
            # the run's last step becomes the job's model (final/, named in _succeed), so it is not announced
            # as a checkpoint while the process runs or once it has finished the run; a run that ended any
            # other way (it failed, or was paused at its last step) has it as a checkpoint
            finishing = proc.popen.poll() is None or finished_summary(run_dir) is not None
            assert project is not None
            self._sync_checkpoints(
                session, job, project, steps, proc.step_metrics, job.total_steps if finishing else None
            )

    def _sync_checkpoints(
        self,
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
            metrics = {"step": float(step)} | {
                k: v for k, v in step_metrics.get(step, {}).items() if k in CHECKPOINT_METRICS
            }
            session.add(_checkpoint(job, step, metrics, name, f"run/checkpoints/step-{step}/model"))
            add_event(session, job.id, f"Checkpoint created at step {step} with Snapshot ID: {name}")
        for step, ckpt in known.items():
            if step not in steps and not ckpt.deleted:
                ckpt.deleted = True

    def _resolve_hyperparameters(self, job: Job, run_dir: Path) -> None:
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return
        if not isinstance(config, dict) or "total_steps" not in config:
            return
        resolved = {
            "batch_size": config.get("batch_size"),
            "learning_rate_multiplier": config.get("learning_rate_multiplier"),
            "n_epochs": config.get("epochs"),
        }
        kind = job.method["type"]
        method = json.loads(json.dumps(job.method))
        hp = method.setdefault(kind, {}).get("hyperparameters") or {}
        hp.update(resolved)
        if kind in ("dpo", "kto"):
            hp["beta"] = config.get("beta") or 0.1
        method[kind]["hyperparameters"] = hp
        job.method, job.hyperparameters = method, resolved
        job.total_steps = int(config["total_steps"])

    def _finished_training(self, proc: Proc, code: int) -> None:
        directory = job_dir(self.settings, proc.job_id)
        run_dir = directory / "run"
        with self.store.session() as session:
            job = session.get(Job, proc.job_id)
            if job is None:
                return
            job.pid = None
            if job.status == "cancelled" or proc.stop_reason == "cancel":
                return
            summary = finished_summary(run_dir)
            if summary is not None:
                if code != 0 and proc.stop_reason is None:
                    how = death_cause(code) or f"exited with status {code}"
                    add_event(
                        session,
                        job.id,
                        f"The training process {how} after it had saved the final model and its summary",
                        level="warn",
                    )
                self._succeed(session, job, run_dir, summary)
            elif proc.stop_reason == "pause":
                steps = sorted(_checkpoint_steps(run_dir))
                at = f"step {steps[-1]}" if steps else "the start"
                add_event(session, job.id, f"Job paused; it will resume from {at}")
            elif proc.stop_reason == "shutdown":
                pass  # stays `running`: recover() queues it again on the next start
            elif proc.stop_reason == "turn":  # its project's turn comes again after the others' (_take_turns)
                job.status, job.estimated_finish = "queued", None  # first of its project's jobs, as before
                add_event(
                    session, job.id, f"Job queued again; it will continue from {_resume_point(run_dir)}"
                )
            else:
                message = tail_error(directory / "train.log", code, proc.log_offset)
                cause = death_cause(code) or stop_cause(message)
                if cause is not None:
                    self._retry_or_fail(session, job, cause)
                else:
                    self._fail(session, job, "training_failed", f"Fine-tuning failed: {message}")
        self.wake()

    def _retry_or_fail(self, session: Session, job: Job, cause: str) -> None:
        """The training process died (`cause`: "was killed by SIGKILL (out of memory?)"): queue the job again,
        ahead of the others, to continue from its last checkpoint; after `max_job_retries` retries, fail it
        with the cause (a resume by hand starts a new count)."""
        run_dir = job_dir(self.settings, job.id) / "run"
        earlier = _deaths(session, job.id)
        limit = self.settings.max_job_retries
        job.pid, job.estimated_finish = None, None
        if len(earlier) < limit:
            job.status = "queued"  # its queue_seq is older than the jobs queued since: it goes first
            add_event(
                session,
                job.id,
                f"The training process {cause}; retrying from {_resume_point(run_dir)} "
                f"(retry {len(earlier) + 1} of {limit})",
                level="warn",
                data={"retry": len(earlier) + 1, "max_retries": limit, "cause": cause},
            )
            return
        deaths = len(earlier) + 1
        if deaths == 1:
            how = cause
        elif all(c == cause for c in earlier):
            how = f"{cause} {deaths} times"
        else:
            how = f"died {deaths} times; the last time it {cause}"
        steps = sorted(_checkpoint_steps(run_dir))
        where = f"the last checkpoint is at step {steps[-1]}" if steps else "no checkpoint was saved"
        then = "Resume the job to try again." if self._resumable(job) else "Create the job again to retry."
        self._fail(session, job, DIED, f"Fine-tuning failed: the training process {how}; {where}. {then}")

    def _succeed(self, session: Session, job: Job, run_dir: Path, summary: dict[str, Any]) -> None:
        project = session.get(Project, job.project_id)
        assert project is not None
        name = fine_tuned_name(job.base_model, project.name, job.suffix, job.model_key)
        # with a validation set final/ holds the best evaluation's weights (select_best), not the last step's
        step = int(
            summary.get("final_step") or summary.get("steps") or job.total_steps or max(job.last_step, 0)
        )
        metrics = {"step": float(step)} | {
            k: v for k, v in (summary.get("final_metrics") or {}).items() if k in CHECKPOINT_METRICS
        }
        records = []
        metrics_path = run_dir / "metrics.jsonl"
        if metrics_path.is_file():
            for line in metrics_path.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        step_metrics: dict[int, dict[str, Any]] = {}
        for record in records:
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                step_metrics.setdefault(record["step"], {}).update(record)
        # checkpoints not seen yet (the last step's, when final/ holds an earlier step's weights) are named
        self._sync_checkpoints(session, job, project, _checkpoint_steps(run_dir), step_metrics, step)
        # the model is a checkpoint of its own, under the model's name: never a checkpoint renamed, so
        # every name an event gave stays the name of the same checkpoint
        final = session.scalar(
            select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.path == "run/final")
        )
        if final is None:
            final = _checkpoint(job, step, metrics, name, "run/final")
            session.add(final)
        final.name, final.step_number, final.metrics = name, step, metrics
        result = self._store_result_file(session, job, base64.b64encode(results_csv(records).encode()))
        job.status, job.fine_tuned_model, job.finished_at = "succeeded", name, now()
        job.trained_tokens = int(summary.get("trained_tokens") or 0)
        job.estimated_finish = None
        job.result_files = [result]
        add_event(session, job.id, f"New fine-tuned model created: {name}")
        if summary.get("final_step") and summary["final_step"] != summary.get("steps"):
            how = "stopped early" if summary.get("stopped_early") else "trained"
            add_event(
                session,
                job.id,
                f"The model holds the weights of step {summary['final_step']}, its lowest validation loss "
                f"({summary.get('best_valid_loss', float('nan')):.4f}); the job {how} to step {summary['steps']}",
            )
        energy = energy_message(summary.get("energy"))
        if energy:
            add_event(session, job.id, energy)
        for flag in summary.get("safety_flags") or []:  # the tuned model is worse than its base (evals.json)
            add_event(session, job.id, f"Safety evaluation: {flag}", level="warn")
        add_event(session, job.id, "The job has successfully completed")

    def _store_result_file(self, session: Session, job: Job, content: bytes) -> str:
        file_id = new_id("file-")
        path = self.settings.files_dir / file_id
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

    def _fail(self, session: Session, job: Job, code: str, message: str, param: str | None = None) -> None:
        message = self._public(job, message)
        job.status, job.finished_at, job.estimated_finish, job.pid = "failed", now(), None, None
        job.error = {"code": code, "message": message, "param": param}
        add_event(session, job.id, message, level="error")

    def _public(self, job: Job, message: str) -> str:
        """A message for the caller, without the server's paths: the job's files by their ids, its run
        directory as `run`, the data directory as DATA_DIR, the interpreter as `python`."""
        directory = job_dir(self.settings, job.id)
        names = {str(directory / "training.jsonl"): job.training_file, str(directory) + "/": ""}
        if job.validation_file:
            names[str(directory / "validation.jsonl")] = job.validation_file
        if job.parent_adapter:
            names[job.parent_adapter] = job.model
        names[job.local_model] = job.base_model  # when it is a path
        names[str(self.settings.data_dir)] = "DATA_DIR"
        python = Path(self.settings.python)
        prefixes = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
        if python.parent.name == "bin":
            prefixes.add(str(python.parent.parent))
        names |= {prefix: "PYTHON_PREFIX" for prefix in prefixes}
        names |= {self.settings.python: "python", sys.executable: "python", str(Path.home()): "~"}
        # the longest first (a job's file before its directory, the interpreter before its prefix); a short
        # path (`/`, `/usr`, a user's home `/root`) says nothing, and replacing it would garble the message
        for path in sorted(names, key=len, reverse=True):
            if len(Path(path).parts) >= 3:
                message = message.replace(path, names[path])
        return message

    # --- signals ----------------------------------------------------------------------------------------

    def _terminate(self, proc: Proc, graceful: bool) -> None:
        if graceful:
            self._signal(proc, signal.SIGTERM)
            proc.kill_at = time.monotonic() + self.settings.stop_grace_seconds
        else:
            self._signal(proc, signal.SIGKILL)

    @staticmethod
    def _signal(proc: Proc, signum: int) -> None:
        """SIGTERM goes to the recipe's process (it checkpoints); SIGKILL to its whole process group."""
        try:
            if signum == signal.SIGKILL:
                os.killpg(proc.popen.pid, signum)
            else:
                proc.popen.send_signal(signum)
        except (ProcessLookupError, PermissionError):
            pass


def _past(status: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed", "cancelled": "been cancelled"}.get(status, status)


def _resume_point(run_dir: Path) -> str:
    """Where a job continues: "the checkpoint at step 40", or "the start (no checkpoint was saved)"."""
    steps = _checkpoint_steps(run_dir)
    return f"the checkpoint at step {max(steps)}" if steps else "the start (no checkpoint was saved)"


def _deaths(session: Session, job_id: str) -> list[str]:
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


def _checkpoint_steps(run_dir: Path) -> set[int]:
    root = run_dir / "checkpoints"
    steps: set[int] = set()
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith("step-") and (path / "state.json").is_file():
                try:
                    steps.add(int(path.name.removeprefix("step-")))
                except ValueError:
                    continue
    return steps


def _read_new_records(path: Path, proc: Proc) -> list[dict[str, Any]]:
    """Complete lines appended to metrics.jsonl since the last read (a resumed run rewrites the file, so a
    shorter file starts the reading over; events for steps already reported are skipped by the caller)."""
    try:
        size = path.stat().st_size
    except OSError:
        return []
    if size < proc.offset:
        proc.offset = 0
    if size == proc.offset:
        return []
    with path.open("rb") as fh:
        fh.seek(proc.offset)
        chunk = fh.read(size - proc.offset)
    end = chunk.rfind(b"\n")
    if end < 0:
        return []
    proc.offset += end + 1
    records = []
    for line in chunk[: end + 1].splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def _stop_orphan(pid: int, job_id: str, grace: float) -> bool:
    """A training process that outlived the server that started it: stop it (it checkpoints on SIGTERM)
    before the job resumes, so two processes never write one run directory. Checked by its command line,
    so a recycled pid is left alone. False when the job's process was gone already."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    if job_id not in cmdline:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        if _is_zombie(pid):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def link_or_copy(src: Path, dst: Path) -> None:
    """Give a job its own name for an uploaded file (a hard link: no copy of the bytes)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
