"""Run untrusted `grade(sample, item)` code for a whole batch in one separate, locked-down process.

    outcomes = run_python_batch(source, [(sample, item), ...], SandboxLimits(timeout=120))

What the child gets (set up by `_runner.py` before the user's code runs):
- `python -I -B` (isolated: no PYTHON* variables, no user site, no cwd on sys.path), a clean environment
  (PATH, LANG, HOME and TMPDIR pointing at the scratch directory, one BLAS thread), and a fresh scratch
  directory as cwd, deleted afterwards;
- resource limits, soft and hard: address space (2 GiB), CPU seconds (the timeout + 1), file size (1 GiB),
  256 open files, no core dumps;
- on Linux a new network namespace, inside a new user namespace where the kernel allows one (as root that
  also drops every capability outside it): the child has no network interface but its own loopback;
- on x86-64 Linux a seccomp filter: no fork/vfork/exec, no threads-only-exempt clone, no sockets of any
  kind, no ptrace, no signals to other processes, no new namespaces or mounts, no raising the limits;
- an audit hook (PEP 578): refuses subprocess/os.system/exec/fork, ctypes and cffi, sockets, signals,
  gc and tracing introspection, and opens outside the scratch directory, except reads of Python's own
  library directories (so `import json, math, numpy` works) and /dev/null, /dev/urandom;
- a wall-clock timeout for the whole batch (120 s) after which the process group is killed.

What it does not give: the audit hook is a Python-level check (PEP 578 says as much), so a native
extension that makes system calls directly can read files the user running Tunery can read; the kernel
layers above still hold (no network, no new processes on x86-64, the limits). Without seccomp (other
architectures) and without namespaces (kernels that forbid them), only the audit hook and the limits
stand. `RLIMIT_NPROC` is not set: it counts every process and thread of the user, the trainer's
included, so any useful value would break either the trainer or the grader.

Limits are set by the child on itself before user code runs rather than in `preexec_fn`, which is unsafe
in a multi-threaded parent such as a trainer (the fork can deadlock on a lock another thread holds).
The batch runs in one process; a sample that crashes it (os._exit, a segfault) loses only itself, and a
fresh process continues with the next sample while time remains.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 120.0  # wall-clock seconds for a whole batch
    memory_bytes: int = 2 * 2**30  # address space
    cpu_seconds: int | None = None  # default: the timeout + 1
    file_bytes: int = 2**30  # largest file the code may write
    open_files: int = 256
    network_namespace: bool = True  # unshare the network namespace where the kernel allows it


@dataclass
class Outcome:
    """One sample's result: a score, or an error of kind "runtime" (the code raised or returned a
    non-number), "timeout" or "crash" (the process died)."""

    score: float | None = None
    error: str | None = None
    kind: str | None = None
    seconds: float = 0.0


@dataclass
class _Run:
    started: bool = False
    timed_out: bool = False
    returncode: int | None = None
    stderr_tail: bytes = b""
    info: dict[str, Any] | None = None


@functools.cache
def _runner_source() -> str:
    return (Path(__file__).parent / "_runner.py").read_text()


def _environment(scratch: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": scratch,
        "TMPDIR": scratch,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # older OpenBLAS crashes without them here
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def run_python_batch(
    source: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]], limits: SandboxLimits | None = None
) -> list[Outcome]:
    """Grade every (sample, item) pair with `source`'s grade() in one sandboxed process."""
    limits = limits or SandboxLimits()
    outcomes: list[Outcome | None] = [None] * len(pairs)
    deadline = time.monotonic() + limits.timeout
    scratch = tempfile.mkdtemp(prefix="tunery-grader-")
    try:
        start = 0
        while start < len(pairs):
            run = _run_once(source, pairs, start, scratch, limits, deadline, outcomes)
            pending = [i for i in range(start, len(pairs)) if outcomes[i] is None]
            if not pending:
                break
            if run.timed_out:
                for i in pending:
                    outcomes[i] = Outcome(
                        error=f"the batch exceeded the {limits.timeout:g} s time limit", kind="timeout"
                    )
                break
            why = _death(run)
            if not run.started:  # the sandbox itself failed: retrying would fail the same way
                for i in pending:
                    outcomes[i] = Outcome(error=f"the sandbox did not start: {why}", kind="crash")
                break
            outcomes[pending[0]] = Outcome(
                error=f"the grader process died on this sample: {why}", kind="crash"
            )
            start = pending[0] + 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [o if o is not None else Outcome(error="not graded", kind="crash") for o in outcomes]


def _run_once(
    source: str,
    pairs: list[tuple[dict[str, Any], dict[str, Any]]],
    start: int,
    scratch: str,
    limits: SandboxLimits,
    deadline: float,
    outcomes: list[Outcome | None],
) -> _Run:
    request = {
        "source": source,
        "scratch": scratch,
        "pairs": pairs,
        "start": start,
        "network_namespace": limits.network_namespace,
        "limits": {
            "memory_bytes": limits.memory_bytes,
            "cpu_seconds": limits.cpu_seconds or int(limits.timeout) + 1,
            "file_bytes": limits.file_bytes,
            "open_files": limits.open_files,
        },
    }
    payload = json.dumps(request).encode()
    run = _Run()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _runner_source()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=scratch,
            env=_environment(scratch),
            start_new_session=True,  # its own process group, killed whole below
            close_fds=True,
        )
    except OSError as exc:  # no process at all: reported as a sandbox that did not start
        run.stderr_tail = f"{exc.__class__.__name__}: {exc}".encode()
        return run
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    selector = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    selector.register(proc.stdin, selectors.EVENT_WRITE)
    selector.register(proc.stdout, selectors.EVENT_READ)
    selector.register(proc.stderr, selectors.EVENT_READ)
    buffer, last, open_outputs = b"", time.monotonic(), 2
    try:
        while open_outputs:  # until the child closes stdout and stderr (it exited)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                run.timed_out = True
                break
            for key, _ in selector.select(timeout=remaining):
                if key.fileobj is proc.stdin:
                    try:
                        written = os.write(proc.stdin.fileno(), payload[:65536])
                    except (BrokenPipeError, OSError):
                        written, payload = 0, b""
                    payload = payload[written:]
                    if not payload:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    open_outputs -= 1
                    continue
                if key.fileobj is proc.stderr:
                    run.stderr_tail = (run.stderr_tail + data)[-4000:]
                    continue
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    last = _record(line, run, outcomes, last)
                if len(buffer) > 2**20:  # a line longer than any result: not the runner writing
                    run.stderr_tail += b"\n[the result channel received a runaway line]"
                    break
    finally:
        selector.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it managed to start
        run.returncode = proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if not stream.closed:
                stream.close()
    return run


def _record(line: bytes, run: _Run, outcomes: list[Outcome | None], last: float) -> float:
    """Store one result line; ignore anything malformed (user code can write to any descriptor)."""
    try:
        record = json.loads(line)
        if record.get("ready") is True:
            run.started, run.info = True, record
            return time.monotonic()
        i = record["i"]
        if not (isinstance(i, int) and 0 <= i < len(outcomes)) or outcomes[i] is not None:
            return last
        now = time.monotonic()
        if "score" in record:
            outcomes[i] = Outcome(score=float(record["score"]), seconds=now - last)
        else:
            outcomes[i] = Outcome(error=str(record["error"])[:4000], kind="runtime", seconds=now - last)
        return now
    except (ValueError, TypeError, KeyError, AttributeError):
        return last


def _death(run: _Run) -> str:
    code = run.returncode
    if code is not None and code < 0:
        why = f"killed by {signal.Signals(-code).name}"
        if -code == signal.SIGXCPU:
            why += " (the CPU time limit)"
        elif -code == signal.SIGKILL:
            why += " (the memory or CPU limit, or the kernel)"
    else:
        why = f"exited with status {code}"
    tail = run.stderr_tail.decode("utf-8", "replace").strip()
    return why + (f"; stderr: {tail[-1000:]}" if tail else "")


def sandbox_info(limits: SandboxLimits | None = None) -> dict[str, Any]:
    """What the sandbox achieved on this machine: {"seccomp": bool, "namespaces": "user+net"|"net"|""}."""
    limits = limits or SandboxLimits(timeout=30)
    scratch = tempfile.mkdtemp(prefix="tunery-grader-")
    try:
        run = _run_once(
            "def grade(s, i):\n    return 0.0\n", [], 0, scratch, limits, time.monotonic() + 30, []
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dict(run.info or {})
