"""Run untrusted `grade(sample, item)` code for a whole batch in one separate process that the kernel confines.

    outcomes = run_python_batch(source, [(sample, item), ...], SandboxLimits(timeout=120))

The boundary is bubblewrap (`bwrap`, Debian's `bubblewrap`, the tool Flatpak confines its apps with): it
puts the grader in new user, mount, PID, network, IPC, UTS and cgroup namespaces with no capabilities.
What the grader process then sees of the machine:
- Python's standard library and interpreter, read-only, with Python's own site-packages hidden;
- the packages a grader may import (GRADER_PACKAGES, OpenAI's list, as far as they are installed, and
  what they need), read-only, each bound on its own under /grader/site: not the rest of the venv, not Tunery;
- the system's shared libraries (/usr/lib) and time zones;
- /etc holding only a passwd and a group file that name the grader's own user;
- /dev/null, /dev/zero, /dev/urandom and the like (bubblewrap's minimal /dev, read-only);
- /scratch: its private writable directory and cwd, a tmpfs of `scratch_bytes`, remounted noexec, so
  compiled code written there cannot be loaded; it vanishes with the process.
Nothing else exists for it: not the data directory, not another project's files, not /etc/shadow, not
the venv's site-packages, no network interface but its own loopback, no other process.

Before any user code runs, `_runner.py` also hides /proc, drops every capability it holds in its own
namespaces, installs a seccomp filter (no new processes or threads, exec, sockets, ptrace, mounts, namespaces,
memfd, System V shared memory, io_uring, keyrings, module loading, raising limits) and sets resource
limits: address space (2 GiB), CPU seconds (the timeout + 1), file size, 256 open files, no core dumps.
A wall-clock timeout kills the whole process group. A Python audit hook (PEP 578) refuses the same
things once more at the Python level, for a readable message ("blocked in the grader sandbox: socket"); it is not the boundary.

Why bubblewrap: it is maintained, small (it does one thing: set up namespaces and exec), packaged by
every distribution, and needs no daemon or root. Landlock (in the kernel since 5.13) was the other
candidate: it restricts which files can be opened, but not `stat` (file existence leaks), not the PID or
network view, and not mmap of a written file as code; nsjail and minijail are not packaged by Debian 12.

Where bubblewrap is missing or the kernel refuses user namespaces, python graders are refused with
`SandboxUnavailable`, which says how to fix it, unless the operator opts out by setting
TUNERY_UNCONFINED_GRADERS=1 (`tunery serve --unconfined-python-graders`): the code then runs with only
the seccomp filter, a new network namespace where allowed, the limits and the audit hook, which native
code gets round. The batch runs in one process; a sample that crashes it (os._exit, a segfault) loses
only itself, and a fresh process continues with the next sample while time remains.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError

# What a grader may import, as OpenAI's python grader image lists it; those installed are offered, each
# with the distributions it requires.
GRADER_PACKAGES = (
    "numpy", "scipy", "sympy", "pandas", "rapidfuzz", "scikit-learn", "rouge-score", "deepdiff",
    "jsonschema", "pydantic", "PyYAML", "nltk", "sqlparse", "rdkit", "scikit-bio", "ast-grep-py",
)  # fmt: skip
UNCONFINED_ENV = "TUNERY_UNCONFINED_GRADERS"  # "1": run python graders without the kernel sandbox
SITE = "/grader/site"  # where the allowed packages appear inside the sandbox
SCRATCH = "/scratch"
GRADER_UID = 65534  # the grader's user inside its namespace


class SandboxUnavailable(TuneryError):
    """Python graders cannot run confined on this machine, and the operator has not opted out."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 120.0  # wall-clock seconds for a whole batch
    memory_bytes: int = 2 * 2**30  # address space
    cpu_seconds: int | None = None  # default: the timeout + 1
    file_bytes: int = 2**30  # largest file the code may write, and the size of its scratch tmpfs
    open_files: int = 256
    network_namespace: bool = True  # unconfined mode only: unshare the network where the kernel allows it
    # a time.monotonic() moment no batch runs past, whatever its timeout: one request's graders (a multi's
    # python sub-graders) share one time budget instead of getting a timeout each
    deadline: float | None = None
    # whether the request was given up (its client left): a judge model answering stops as at the deadline
    stopped: Callable[[], bool] | None = None


@dataclass
class Outcome:
    """One sample's result: a score, or an error of kind "runtime" (the code raised or returned a
    non-number), "timeout" or "crash" (the process died)."""

    score: float | None = None
    error: str | None = None
    kind: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class SandboxStatus:
    confined: bool  # python graders run under bubblewrap
    detail: str  # the tool and its version, or why the sandbox cannot run here

    @property
    def allowed(self) -> bool:
        """Python graders may run: confined, or the operator opted out of the sandbox."""
        return self.confined or unconfined_allowed()

    def describe(self) -> str:
        if self.confined:
            return f"python graders run in the kernel sandbox ({self.detail})"
        if self.allowed:
            return f"python graders run UNCONFINED ({UNCONFINED_ENV}=1; the sandbox is unavailable: {self.detail})"
        return f"python graders are refused: {self.detail}"


@dataclass
class _Run:
    started: bool = False
    timed_out: bool = False
    returncode: int | None = None
    stderr_tail: bytes = b""
    info: dict[str, Any] | None = None


def unconfined_allowed() -> bool:
    return os.environ.get(UNCONFINED_ENV, "") == "1"


@functools.cache
def sandbox_status() -> SandboxStatus:
    """Whether bubblewrap can confine a grader here: found by running one (about 50 ms, once a process)."""
    if sys.platform != "linux":
        return SandboxStatus(False, f"the sandbox needs Linux (this is {sys.platform})")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return SandboxStatus(
            False, "bubblewrap is not installed (Debian, Ubuntu: apt-get install bubblewrap)"
        )
    run = _run_once(
        "def grade(s, i):\n    return 0.0\n",
        [],
        0,
        None,
        SandboxLimits(timeout=30),
        time.monotonic() + 30,
        [],
    )
    if not (run.info or {}).get("confined"):
        why = _death(run)
        return SandboxStatus(
            False,
            f"bubblewrap could not set up the sandbox ({why}); user namespaces may be disabled "
            "(sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces) or refused by the "
            "container this runs in",
        )
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return SandboxStatus(True, version or "bubblewrap")


def require_sandbox() -> None:
    """Raise SandboxUnavailable unless python graders may run here."""
    status = sandbox_status()
    if not status.allowed:
        raise SandboxUnavailable(
            f"python graders need the bubblewrap sandbox, which this machine cannot provide: {status.detail}. "
            f"Install it, or, only if you trust the author of every grader, set {UNCONFINED_ENV}=1 "
            "(`tunery serve --unconfined-python-graders`) to run them without it."
        )


def run_python_batch(
    source: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]], limits: SandboxLimits | None = None
) -> list[Outcome]:
    """Grade every (sample, item) pair with `source`'s grade() in one sandboxed process."""
    limits = limits or SandboxLimits()
    require_sandbox()
    confined = sandbox_status().confined
    outcomes: list[Outcome | None] = [None] * len(pairs)
    deadline = time.monotonic() + limits.timeout
    if limits.deadline is not None:
        deadline = min(deadline, limits.deadline)
    # confined, the scratch is a tmpfs inside the sandbox; unconfined, a host directory
    scratch = None if confined else tempfile.mkdtemp(prefix="tunery-grader-")
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
                        error=f"the batch exceeded the {limits.timeout:g} s time limit"
                        + (" (shared by the request's graders)" if limits.deadline is not None else ""),
                        kind="timeout",
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
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return [o if o is not None else Outcome(error="not graded", kind="crash") for o in outcomes]


# --- the sandbox's command line ------------------------------------------------------------------------


@functools.cache
def _runner_source() -> str:
    return (Path(__file__).parent / "_runner.py").read_text()


def _environment(home: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # older OpenBLAS crashes without them here
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


@functools.cache
def _python_mounts() -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(read-only binds, directories to hide inside them, interpreter): the system libraries and Python's
    own files, without any site-packages (Python's, Debian's dist-packages)."""
    binds: list[str] = []
    for path in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/share/zoneinfo"):
        if os.path.isdir(path) and not os.path.islink(path):
            binds.append(path)
    python = os.path.realpath(sys.executable)
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}  # never a venv's own paths
    wanted = [python, sysconfig.get_path("stdlib", vars=base), sysconfig.get_path("platstdlib", vars=base)]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        library = os.path.join(
            sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("LDLIBRARY") or ""
        )
        wanted.append(library)
    for path in wanted:
        real = os.path.realpath(path)
        if os.path.exists(real) and not _inside(real, binds):
            binds.append(real)
    candidates = {sysconfig.get_path(k, vars=base) for k in ("purelib", "platlib")}
    candidates |= {os.path.join(b, "dist-packages") for b in ("/usr/lib/python3",)}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates |= {os.path.join(b, version, "dist-packages") for b in ("/usr/lib", "/usr/local/lib")}
    hidden = sorted(
        os.path.realpath(c) for c in candidates if os.path.isdir(c) and _inside(os.path.realpath(c), binds)
    )
    return tuple(binds), tuple(hidden), python


@functools.cache
def _grader_site() -> tuple[tuple[str, str], ...]:
    """(host path, name under SITE) of every top-level file and directory of the allowed distributions and
    of the distributions they require (dist-info included: some packages read their own metadata)."""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    entries: dict[str, str] = {}
    seen: set[str] = set()
    todo = list(GRADER_PACKAGES)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for text in dist.requires or []:
            try:
                requirement = Requirement(text)
            except InvalidRequirement:
                continue
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
        root = Path(str(dist.locate_file("")))
        for file in dist.files or []:
            top = file.parts[0] if file.parts else ""
            if not top or top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            path = root / top
            if path.exists():
                entries.setdefault(top, str(path))
    return tuple(sorted((path, top) for top, path in entries.items()))


def _bwrap_command(bwrap: str, limits: SandboxLimits, stub_fds: tuple[int, int]) -> list[str]:
    binds, hidden, python = _python_mounts()
    # No --new-session: bubblewrap is already a session leader with no terminal (start_new_session below),
    # and staying in its process group lets one killpg stop the grader at once (setsid is refused)
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--hostname", "grader"]
    argv += ["--uid", str(GRADER_UID), "--gid", str(GRADER_UID)]
    if os.geteuid() == 0:
        argv += ["--cap-drop", "ALL"]
    for top in ("/lib", "/lib64", "/lib32", "/bin"):  # merged-/usr systems: symlinks into /usr
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top) and top != "/bin":
            argv += ["--ro-bind", top, top]
    for path in binds:
        argv += ["--ro-bind", path, path]
    for path in hidden:  # an empty, read-only directory over Python's own site-packages
        argv += ["--tmpfs", path, "--remount-ro", path]
    argv += ["--tmpfs", SITE]
    for path, name in _grader_site():
        argv += ["--ro-bind", path, f"{SITE}/{name}"]
    argv += ["--remount-ro", SITE]
    passwd_fd, group_fd = stub_fds
    argv += ["--perms", "0444", "--ro-bind-data", str(passwd_fd), "/etc/passwd"]
    argv += ["--perms", "0444", "--ro-bind-data", str(group_fd), "/etc/group"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    argv += ["--perms", "0700", "--size", str(limits.file_bytes), "--tmpfs", SCRATCH]
    argv += ["--remount-ro", "/", "--chdir", SCRATCH, "--clearenv"]
    for name, value in _environment(SCRATCH).items():
        argv += ["--setenv", name, value]
    return [*argv, "--", python, "-I", "-S", "-B", "-c", _runner_source()]


def _stub_files() -> tuple[bytes, bytes]:
    user = f"grader:x:{GRADER_UID}:{GRADER_UID}:grader:{SCRATCH}:/nonexistent\n"
    return user.encode(), f"grader:x:{GRADER_UID}:\n".encode()


# --- running it ----------------------------------------------------------------------------------------


def _run_once(
    source: str,
    pairs: list[tuple[dict[str, Any], dict[str, Any]]],
    start: int,
    scratch: str | None,
    limits: SandboxLimits,
    deadline: float,
    outcomes: list[Outcome | None],
) -> _Run:
    """One process over pairs[start:]: confined under bubblewrap when `scratch` is None, else the
    unconfined runner with `scratch` as its directory."""
    request = {
        "source": source,
        "confine": scratch is None,
        "scratch": SCRATCH if scratch is None else scratch,
        "site": SITE if scratch is None else None,
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
    stub_fds: list[int] = []
    try:
        if scratch is None:
            for content in _stub_files():  # a pipe each: the stub is copied in, nothing is left on disk
                read_end, write_end = os.pipe()
                os.write(write_end, content)
                os.close(write_end)
                stub_fds.append(read_end)
            bwrap = shutil.which("bwrap") or "bwrap"
            command = _bwrap_command(bwrap, limits, (stub_fds[0], stub_fds[1]))
            cwd, env = "/", _environment(SCRATCH)
        else:
            command = [sys.executable, "-I", "-B", "-c", _runner_source()]
            cwd, env = scratch, _environment(scratch)
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,  # its own process group, killed whole below
            close_fds=True,
            pass_fds=stub_fds,
        )
    except OSError as exc:  # no process at all: reported as a sandbox that did not start
        run.stderr_tail = f"{exc.__class__.__name__}: {exc}".encode()
        return run
    finally:
        for fd in stub_fds:
            os.close(fd)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    selector = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    selector.register(proc.stdin, selectors.EVENT_WRITE)
    selector.register(proc.stdout, selectors.EVENT_READ)
    selector.register(proc.stderr, selectors.EVENT_READ)
    buffer, last, open_outputs = b"", time.monotonic(), 2
    # the runner writes a ready line and one line a sample: more is user code writing to the channel, each
    # line parsed here in the API's process (20 s of `b"{}\n" * 20000` writes had cost it 19 s of CPU)
    lines_left = len(pairs) - start + 1 + STRAY_LINES
    cut_off = b""  # why the channel stopped being read (the process is then killed)
    try:
        while open_outputs and not cut_off:  # until the child closes stdout and stderr (it exited)
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
                lines_left -= len(lines)
                if lines_left < 0:
                    cut_off = b"more lines than there are results"
                    break
                for line in lines:
                    last = _record(line, run, outcomes, last)
                if len(buffer) > 2**20:  # a line longer than any result: not the runner writing
                    cut_off = b"a runaway line"
                    break
        if cut_off:
            run.stderr_tail += b"\n[the result channel received " + cut_off + b"]"
    finally:
        selector.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # bubblewrap and the grader, or the unconfined runner
        run.returncode = proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if not stream.closed:
                stream.close()
    return run


# lines on the result channel besides the runner's own (one a result, and the ready line) that are parsed and
# ignored before the channel is cut off: user code can write to it, and each line is parsed in the caller's
# process
STRAY_LINES = 1000


def _record(line: bytes, run: _Run, outcomes: list[Outcome | None], last: float) -> float:
    """Store one result line; ignore anything malformed (user code can write to any descriptor)."""
    try:
        record = json.loads(line)
        if record.get("ready") is True:
            if not run.started:
                run.started, run.info = True, record
            return time.monotonic()
        i = record["i"]
        if not (isinstance(i, int) and 0 <= i < len(outcomes)) or outcomes[i] is not None:
            return last
        now = time.monotonic()
        if "score" in record:
            score = record["score"]
            if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
                return last  # the runner sends finite floats only: not the runner writing
            outcomes[i] = Outcome(score=float(score), seconds=now - last)
        else:
            outcomes[i] = Outcome(error=str(record["error"])[:4000], kind="runtime", seconds=now - last)
        return now
    except Exception:  # deep nesting (RecursionError), a huge number (OverflowError), anything else odd
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
    """What the sandbox achieved on this machine, as the runner reports it: {"confined": bool (bubblewrap,
    noexec scratch, /proc hidden, no capabilities), "seccomp": bool, "namespaces": ...}."""
    limits = limits or SandboxLimits(timeout=30)
    confined = sandbox_status().confined
    scratch = None if confined else tempfile.mkdtemp(prefix="tunery-grader-")
    try:
        run = _run_once(
            "def grade(s, i):\n    return 0.0\n", [], 0, scratch, limits, time.monotonic() + 30, []
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return dict(run.info or {})
