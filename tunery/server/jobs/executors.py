"""Where a job's training command runs: here, as a child process (`--executor local`, the default), or on a
Ray cluster as a Ray job (`--executor ray --ray-address ADDR`), through Ray's job submission API. Either way
the command is the one a user would type (`python -m tunery train ...`), and what the scheduler holds is a
Runner: it polls it, stops it (SIGTERM, the recipe checkpoints; SIGKILL after the grace period) and reads
its output.

On Ray each attempt of a job is one Ray job, `<job id>-<attempt>` (its submission id): a restarted service
finds the attempt it left running by that name and follows it again rather than starting a second one.
Ray places the job on a node with the CPUs, GPUs and memory it asks for (`resources`), and runs as many at
once as the cluster holds. The run directory is on storage every node sees (the service's data directory),
so the service reads the run's metrics and checkpoints as it does for a local job; the command's output
comes back through Ray and is appended to the job's train.log.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from tunery.errors import TuneryError

# what a job asks of a node when neither the job nor the operator says (Tunery's `resources` extension
# field of a job, `tunery serve --job-cpus/--job-memory-gb`): one CPU, and the memory the method's models
# take at the bundled model's size with room to spare. A method that holds a second model (DPO's and KTO's
# reference, GRPO's decoding engine) asks for more.
DEFAULT_MEMORY_GB = {"supervised": 2.0, "reward_model": 2.0, "dpo": 3.0, "kto": 3.0, "reinforcement": 3.0}


@dataclass(frozen=True)
class Resources:
    """What one training process needs of the node it runs on (Ray reserves it; local ignores it)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float | None = None

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU"]
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU")
        if self.memory_gb:
            parts.append(f"{self.memory_gb:g} GB memory")
        return ", ".join(parts)


class Runner(Protocol):
    """A training or file-checking command the scheduler started."""

    pid: int | None  # a local process's id (the database keeps it to find an orphan); None on Ray

    @property
    def ray_job(self) -> str | None:
        """A Ray job's submission id (the database keeps it to follow the job again); None here."""

    @property
    def name(self) -> str:
        """What the job's events call it: "pid 1234", "Ray job ftjob-...-2"."""

    def poll(self) -> int | None:
        """Its exit status once it has ended (negative: killed by that signal), else None."""

    def started(self) -> bool:
        """Whether the command runs (a Ray job may wait for a node with room for it)."""

    def lost(self) -> str | None:
        """Why it ended without an exit status of its own (its node died), if it did."""

    def unplaced(self) -> str | None:
        """Why the cluster never started it (no node had what it asks for), if so."""

    def stop(self, force: bool) -> None:
        """SIGTERM to the command (it checkpoints and exits), or SIGKILL to all it started."""

    def wait(self, timeout: float | None) -> int | None:
        """Its exit status, waiting at most `timeout` seconds (None: not ended yet)."""

    def copy_output(self) -> None:
        """Bring the output it wrote since the last call into the job's log (Ray; local writes it there)."""


class LocalRunner:
    """A child process in a session of its own: SIGTERM to the command, SIGKILL to its process group."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid: int | None = popen.pid
        self.ray_job: str | None = None
        self.name = f"pid {popen.pid}"

    def poll(self) -> int | None:
        return self.popen.poll()

    def started(self) -> bool:
        return True

    def lost(self) -> str | None:
        return None

    def unplaced(self) -> str | None:
        return None

    def stop(self, force: bool) -> None:
        try:
            if force:
                os.killpg(self.popen.pid, signal.SIGKILL)
            else:
                self.popen.send_signal(signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float | None) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def copy_output(self) -> None:
        pass


def start_local(command: list[str], cwd: Path, stdout: IO[bytes], stderr: IO[bytes] | int) -> LocalRunner:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    popen = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=cwd, env=env, start_new_session=True)
    return LocalRunner(popen)


# --- Ray ------------------------------------------------------------------------------------------------

# Ray job statuses (ray.job_submission.JobStatus values)
_WAITING, _RUNNING = "PENDING", "RUNNING"
_ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
STATUS_EVERY = 1.0  # seconds between status requests to the cluster, per job
OUTPUT_EVERY = 30.0  # ... between copies of a running job's output into train.log (and at its end)
# an ended job's output is read again until the cluster gives it (its node's agent can answer late, or
# time out under load), for at most this long before the end is reported with what was copied
FINAL_OUTPUT_SECONDS = 20.0
REQUEST_SECONDS = 20.0  # an answer of the cluster's job API takes at most this long
UNPLACED = ("JOB_SUPERVISOR_ACTOR_UNSCHEDULABLE", "JOB_SUPERVISOR_ACTOR_START_TIMEOUT")


class ClusterUnavailable(Exception):
    """The cluster's job API did not answer (or answered with an error): try again later."""


class RayExecutor:
    """The cluster's job submission API at `address` (the Ray dashboard's, e.g. http://HEAD:8265)."""

    def __init__(self, address: str, stop_grace_seconds: float) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray sends no usage report from here
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise TuneryError(
                "--executor ray needs Ray's job submission client: pip install 'tunery[cluster]'"
            ) from None
        if "://" not in address:
            address = f"http://{address}"
        self.address = address
        self.stop_grace_seconds = stop_grace_seconds

        class Client(JobSubmissionClient):  # type: ignore[misc,unused-ignore]  # (typed or not, by version)
            def _do_request(self, *args: Any, **kwargs: Any) -> Any:  # every request with a timeout
                kwargs.setdefault("timeout", REQUEST_SECONDS)
                return super()._do_request(*args, **kwargs)

        try:
            self.client = Client(address)
        except Exception as exc:  # ConnectionError, or Ray's RuntimeError with the cluster's answer
            raise TuneryError(
                f"--ray-address {address}: cannot reach the Ray cluster's job API ({_short(exc)}); start the "
                "head with `ray start --head --dashboard-host 0.0.0.0` and give its dashboard address, "
                "http://HEAD:8265"
            ) from None

    def submit(
        self, submission_id: str, command: list[str], cwd: Path, resources: Resources, log_path: Path
    ) -> RayRunner:
        """The command as a Ray job named `submission_id`, run in `cwd` (on shared storage) on a node with
        `resources`. A job of that name already on the cluster (a service restarted between submitting and
        recording it) is followed, not submitted again."""
        existing = self.attach(submission_id, log_path)
        if existing is not None:
            return existing
        entrypoint = f"cd {shlex.quote(str(cwd))} && exec {shlex.join(command)}"
        env = {
            "PYTHONUNBUFFERED": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            # the job's supervisor waits this long after SIGTERM (the recipe checkpoints) before SIGKILL
            "RAY_JOB_STOP_WAIT_TIME_S": str(max(1, int(self.stop_grace_seconds))),
            "OMP_NUM_THREADS": str(max(1, int(resources.cpus))),
        }
        extra: dict[str, Any] = {}
        if resources.memory_gb:
            extra["entrypoint_memory"] = int(resources.memory_gb * 2**30)
        self.client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env={"env_vars": env},
            entrypoint_num_cpus=resources.cpus,
            entrypoint_num_gpus=resources.gpus,
            metadata={"tunery": "fine-tuning job"},
            **extra,
        )
        return RayRunner(self, submission_id, log_path)

    def attach(self, submission_id: str, log_path: Path) -> RayRunner | None:
        """The Ray job of that name, if the cluster has it; ClusterUnavailable when the cluster cannot say
        (it is away, or answered with an error): only a clear "no such job" is None."""
        try:
            self.client.get_job_info(submission_id)
        except RuntimeError as exc:  # Ray's client: "Request failed with status code N: ..."
            if "status code 404" in str(exc) or "does not exist" in str(exc):
                return None
            raise ClusterUnavailable(_short(exc)) from None
        except Exception as exc:  # requests' ConnectionError, Timeout
            raise ClusterUnavailable(_short(exc)) from None
        runner = RayRunner(self, submission_id, log_path)
        runner.copied = _size(log_path.with_suffix(f".{submission_id}.offset"))
        return runner


@dataclass
class RayRunner:
    executor: RayExecutor
    submission_id: str
    log_path: Path  # the job's train.log, where its output is copied
    pid: int | None = None
    copied: int = 0  # characters of the Ray job's log already in train.log
    status: str = _WAITING
    message: str = ""
    exit_code: int | None = None
    error_type: str | None = None
    _checked: float = 0.0
    _copied_at: float = 0.0
    _stop_sent: bool = field(default=False)
    _ended_at: float | None = None  # when the cluster first said it ended
    _output_done: bool = False  # its whole output is in train.log (or FINAL_OUTPUT_SECONDS passed)

    @property
    def name(self) -> str:
        return f"Ray job {self.submission_id}"

    @property
    def ray_job(self) -> str | None:
        return self.submission_id

    def _refresh(self, now: bool = False) -> None:
        if self.status in _ENDED or (not now and time.monotonic() - self._checked < STATUS_EVERY):
            return
        self._checked = time.monotonic()
        try:
            info = self.executor.client.get_job_info(self.submission_id)
        except Exception:  # the cluster is unreachable for a moment: ask again at the next look
            return
        self.status = str(getattr(info.status, "value", info.status))
        self.message = info.message or ""
        self.exit_code = info.driver_exit_code
        self.error_type = str(getattr(info.error_type, "value", info.error_type) or "") or None
        if self.status in _ENDED and self._ended_at is None:
            self._ended_at = time.monotonic()

    def _final_output(self) -> bool:
        """Whether the ended job's output is in train.log: read until the cluster gives some, or the
        deadline passes (a job ended with no output, or a cluster that stopped answering)."""
        if not self._output_done:
            got = self._copy(force=True)
            waited = time.monotonic() - (self._ended_at or 0.0)
            self._output_done = got or waited >= FINAL_OUTPUT_SECONDS
        return self._output_done

    def poll(self) -> int | None:
        self._refresh()
        if self.status not in _ENDED or not self._final_output():
            return None
        if self.status == "SUCCEEDED":
            return 0
        if self.status == "STOPPED":
            return self.exit_code if self.exit_code is not None else -signal.SIGTERM
        if self.exit_code is not None:
            return self.exit_code
        return -signal.SIGKILL  # it ended with no exit status: its node or its supervisor died (lost())

    def started(self) -> bool:
        self._refresh()
        return self.status != _WAITING

    def unplaced(self) -> str | None:
        """Why the cluster never started it (no node had the resources it asks for), if so."""
        if self.status == "FAILED" and self.exit_code is None and self.error_type in UNPLACED:
            return _short(self.message) or "no node of the cluster had the resources it asks for"
        return None

    def lost(self) -> str | None:
        if self.status == "FAILED" and self.exit_code is None and self.error_type not in UNPLACED:
            return f"was lost on the Ray cluster ({_short(self.message) or self.error_type or 'no reason given'})"
        return None

    def stop(self, force: bool) -> None:
        """Ray's stop sends SIGTERM to the command and SIGKILL to all it started once the grace period
        (RAY_JOB_STOP_WAIT_TIME_S, set at submission) has passed, so a second, forced stop has nothing to
        add."""
        if self._stop_sent:
            return
        try:
            self.executor.client.stop_job(self.submission_id)
        except Exception:  # the cluster is away: the scheduler asks again at the forced stop
            return
        self._stop_sent = True

    def wait(self, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._refresh(now=True)
            code = self.poll()
            if code is not None or (deadline is not None and time.monotonic() >= deadline):
                return code
            time.sleep(0.5)

    def copy_output(self, force: bool = False) -> None:
        self._copy(force)

    def _copy(self, force: bool) -> bool:
        """Append what the job wrote since the last copy; whether the cluster answered with any output."""
        if not force and time.monotonic() - self._copied_at < OUTPUT_EVERY:
            return False
        self._copied_at = time.monotonic()
        try:
            text = self.executor.client.get_job_logs(self.submission_id)
        except Exception:
            return False
        if len(text) <= self.copied:
            return bool(text)
        with self.log_path.open("ab") as log:
            log.write(text[self.copied :].encode(errors="replace"))
        self.copied = len(text)
        # how much is copied, beside the log: a restarted service goes on from there
        offset = self.log_path.with_suffix(f".{self.submission_id}.offset")
        offset.write_text(str(self.copied))
        return True


def _size(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def _short(exc: object) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:300] if text else ""
