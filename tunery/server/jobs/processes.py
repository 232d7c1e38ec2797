"""The commands the scheduler starts for a job (the file check, the training run) and the signals it
sends them. The file check runs here; the training run where the executor puts it (executors.py): a
local process in a session of its own (SIGTERM goes to the recipe, which checkpoints and exits; SIGKILL to
its whole group), or a Ray job on a cluster."""

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
from tunery.server.jobs.executors import DEFAULT_MEMORY_GB, RayExecutor, Resources, Runner, start_local
from tunery.server.jobs.reports import MetricsReader, checkpoint_steps
from tunery.server.settings import Settings
from tunery.server.store import Job


@dataclass
class Proc:
    """A command the scheduler started for a job."""

    job_id: str
    kind: str  # "validate" | "train"
    runner: Runner
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
    announced: bool = False  # the job was made `running` (a Ray job: once the cluster started it)
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
        runner = start_local(command, directory, out, log_file)
    return Proc(
        job.id,
        "validate",
        runner,
        log_file,
        log_offset=log_offset,
        project=job.project_id,
        pending=pending,
        current=current,
        out_path=out_path,
        stats=stats,
    )


def start_training(settings: Settings, job: Job, ray: RayExecutor | None) -> Proc:
    """`tunery train` of the job, here or on the Ray cluster (attempt `job.attempts + 1`), its output
    appended to train.log after the command line."""
    directory = job_dir(settings, job.id)
    run_dir = directory / "run"
    command = train_command(settings, job)
    resuming = "--resume" in command
    log_path = directory / "train.log"
    log_file = log_path.open("ab")
    log_file.write(f"\n$ {' '.join(command)}\n".encode())
    log_file.flush()
    log_offset = os.fstat(log_file.fileno()).st_size  # after the command line: an error never quotes it
    runner: Runner
    if ray is None:
        runner = start_local(command, directory, log_file, subprocess.STDOUT)
    else:
        name = ray_job_name(job.id, job.attempts + 1)
        runner = ray.submit(name, command, directory, job_resources(settings, job), log_path)
    return training_proc(job, runner, log_file, log_offset, run_dir, resuming)


def attach_training(settings: Settings, job: Job, ray: RayExecutor) -> Proc | None:
    """The job's current attempt on the Ray cluster, followed again by a restarted service (None: the
    cluster has no such Ray job)."""
    directory = job_dir(settings, job.id)
    log_path = directory / "train.log"
    assert job.ray_job is not None  # recover() follows only jobs whose row names their Ray job
    runner = ray.attach(job.ray_job, log_path)
    if runner is None:
        return None
    log_file = log_path.open("ab")
    log_offset = os.fstat(log_file.fileno()).st_size
    return training_proc(job, runner, log_file, log_offset, directory / "run", resuming=job.attempts > 1)


def ray_job_name(job_id: str, attempt: int) -> str:
    return f"{job_id}-{attempt}"


def job_resources(settings: Settings, job: Job) -> Resources:
    """What the job asks of a node: the operator's defaults (or the method's memory,
    executors.DEFAULT_MEMORY_GB), raised where the job's own `resources` field asks for more. Never less:
    a job that under-reserved would crowd other jobs on its node."""
    given = job.resources or {}
    memory = settings.job_memory_gb
    if memory is None:
        memory = DEFAULT_MEMORY_GB.get(job.method["type"], 2.0)
    return Resources(
        cpus=max(float(given.get("cpus", 0)), settings.job_cpus),
        gpus=max(float(given.get("gpus", 0)), settings.job_gpus),
        memory_gb=max(float(given.get("memory_gb", 0)), memory) or None,
    )


def training_proc(
    job: Job, runner: Runner, log_file: IO[bytes], log_offset: int, run_dir: Path, resuming: bool
) -> Proc:
    steps = sorted(checkpoint_steps(run_dir)) if resuming else []
    return Proc(
        job.id,
        "train",
        runner,
        log_file,
        log_offset,
        project=job.project_id,
        metrics=MetricsReader(run_dir),
        resumed=resuming,
        resumed_from=steps[-1] if steps else None,
        start_step=steps[-1] if steps else 0,
    )


def send(proc: Proc, signum: int) -> None:
    """SIGTERM goes to the recipe's process (it checkpoints); SIGKILL to all it started."""
    proc.runner.stop(force=signum == signal.SIGKILL)


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
