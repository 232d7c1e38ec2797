"""The processes the scheduler starts for a job (the file check, the training run) and the signals it
sends them. A process runs in a session of its own: SIGTERM goes to the recipe (it checkpoints and
exits), SIGKILL to its whole group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tunery.server.catalog import job_dir
from tunery.server.jobs.command import train_command, validate_command
from tunery.server.jobs.reports import MetricsReader, checkpoint_steps
from tunery.server.settings import Settings
from tunery.server.store import Job


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
    metrics: MetricsReader | None = None
    resumed: bool = False  # started with `--resume`
    resumed_from: int | None = None  # ... from the checkpoint of this step (None: from the start)
    start_step: int = 0
    full_seen: bool = False
    step_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)


def start_validation(
    settings: Settings, job: Job, files: list[tuple[str, str, Path]], stats: dict[str, Any]
) -> Proc:
    """`tunery data validate` of the first of `files` (param, file id, path); the rest wait in `pending`."""
    current, pending = files[0], files[1:]
    directory = job_dir(settings, job.id)
    out_path = directory / f"validate-{current[0]}.json"
    command = validate_command(settings, job, current[2], current[0])
    log_file = (directory / "validate.log").open("ab")
    log_offset = os.fstat(log_file.fileno()).st_size
    with out_path.open("wb") as out:
        popen = subprocess.Popen(
            command, stdout=out, stderr=log_file, cwd=directory, env=_env(), start_new_session=True
        )
    return Proc(
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


def start_training(settings: Settings, job: Job) -> Proc:
    """`tunery train` of the job, its output appended to train.log after the command line."""
    directory = job_dir(settings, job.id)
    run_dir = directory / "run"
    command = train_command(settings, job)
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
        env=_env(),
        start_new_session=True,
    )
    steps = sorted(checkpoint_steps(run_dir)) if resuming else []
    return Proc(
        job.id,
        "train",
        popen,
        log_file,
        log_offset,
        project=job.project_id,
        metrics=MetricsReader(run_dir),
        resumed=resuming,
        resumed_from=steps[-1] if steps else None,
        start_step=steps[-1] if steps else 0,
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def send(proc: Proc, signum: int) -> None:
    """SIGTERM goes to the recipe's process (it checkpoints); SIGKILL to its whole process group."""
    try:
        if signum == signal.SIGKILL:
            os.killpg(proc.popen.pid, signum)
        else:
            proc.popen.send_signal(signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_orphan(pid: int, job_id: str, grace: float) -> bool:
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
