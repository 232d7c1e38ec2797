"""Every command block of README.md and docs/*.md runs as written (issue 14), so the documentation cannot
drift from the code.

The contract the documentation is written to, as this test implements it:

- Which blocks. Every ```bash and ```python block of README.md, then of each docs/*.md (by name), in
  document order. A block whose nearest non-blank line before its fence is `<!-- not run: REASON -->` is
  not run; the reason must not be empty. A `not run` marker anywhere else, and a ```sh / ```shell /
  ```console fence, fail `test_documentation_marks_what_it_does_not_run`: nothing is skipped silently.
- Where. All files share one scratch directory (a copy of examples/ and configs/) as the working
  directory, with the repository's .venv/bin first on PATH (`tunery` and `python` are the venv's),
  TUNERY_HOME inside the scratch area and no other TUNERY_* variable inherited. Files run in the order
  above and a file's commands see what earlier ones wrote, so a docs page may use `make demo`'s
  runs/support; selecting one file with -k still runs the files before it first.
- A bash line. `#` comments (whole-line and trailing, outside quotes) are stripped and `\\` continuations
  joined, as bash does; here-documents are kept with their command. Each command runs in its own
  `bash -o pipefail -c`, so `cd` and `export` do not carry over to the next line. It must exit 0, unless
  its trailing comment contains `fails:` (`tunery train sft --model nope  # fails: unknown model`); then
  it must exit non-zero. Either way its stderr must not contain "Traceback". `source .venv/bin/activate`
  is a no-op. Other commands get empty stdin, except `tunery chat`: a question, then `/exit`, then EOF.
- Speed-ups. `smollm2-135m-instruct` becomes `tiny-random` (a 2-layer random model built in code) in
  every command, in python blocks and in the scratch configs/*.yaml; a command that gives no `--model`
  but would load the bundled model (its `--model` defaults to it, or it is `tunery train` without
  `--resume` and without a `--config` that names a model) gets `--model tiny-random`: an adapter
  trained on tiny-random would not load onto the bundled model. `tunery train <method>` without
  `--resume` gets `--max-steps 2` appended (the last flag wins, so a documented `--max-steps 20` runs 2
  steps here; `--set max_steps=N` gets `--set max_steps=2`), and `--safety-evals none` where the command has that option (`train rm`
  has not) unless it sets it. Which command has which flag is read from `tunery.cli.build_parser()`.
  A command gets 5 minutes.
- make. `make demo` runs the recipe lines of the Makefile's `demo` target (`$(VENV)/bin/` and `$(PY)`
  become the venv's; its install prerequisite is not run) with the same rewrites. They run once as
  set-up before README.md's first block (README.md:setup; the tour starts "after make demo", so the
  README's own `make demo` block may be marked not run), and again wherever a block that is run says
  `make demo`. Any other `make` line (test, test-slow, fuzz, lint, bench, ...) is not run and is listed
  as such in the report: a block may mix `make demo` with `make test`.
- Ray. A `ray start` line's daemons (the cluster it starts) outlive it, unlike anything else a command
  starts in the background; the harness runs `ray stop --force` at the end of the file.
- The service. A `tunery serve` line starts in the background in its own process group, with
  `--port <a free port>` and `--train-set max_steps=2 --train-set safety_evals=none` (jobs it trains get
  the same speed-ups) appended; it must answer GET /v1/models with 401 or 200 within 90 s. Later commands
  and python blocks of the file see `127.0.0.1:<documented port>` (--port, default 8000; `localhost` too)
  rewritten to the free port. The server is stopped (SIGTERM to its group) at the end of the file, and
  its log must not contain "Traceback".
- A python block runs as a file with the venv's python in the same working directory, after the same
  text rewrites, with `sk-tunery-...` replaced by the key the latest `tunery keys create` (not a
  `--labeller` key) printed. It must exit 0 without a traceback within 5 minutes; a snippet that trains
  through the service must wait for its job itself.
- Report. One test per file; a failure quotes each failing command as written and as run, its block id
  (README.md:3 is the file's third bash/python block), line, exit status and stderr tail, and later
  commands still run. Each command's row is printed as it finishes (past pytest's capture), so a run
  stopped from outside shows how far it got; the full report (every command, time, not-run blocks and
  why) is printed at the end of the session and written to report.txt in the scratch area. A command
  killed at its time limit whose output pipes are still held open (by a process it started in a session
  of its own) is given up 10 s later: the harness cannot wait for ever.

Runtime: about 5 minutes on 2 cores (287 s of commands; the report prints the total), most of it the
~4 s of imports (torch, transformers, peft) of each of ~45 `tunery` processes. So it is left out of the
default run: `make test-docs` (`pytest -m docs`) runs it, and CI does.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.docs.markdown_commands import (
    BUNDLED,
    REPORT_KEY,
    TINY,
    Block,
    Command,
    Plan,
    Rewriter,
    cli_spec,
    extract_blocks,
    make_target,
    split_commands,
)

pytestmark = pytest.mark.docs

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
DOC_FILES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
COMMAND_TIMEOUT = 300.0
PYTHON_TIMEOUT = 300.0
SERVER_START_TIMEOUT = 90.0
DRAIN_TIMEOUT = 10.0
MARKS = {"ok": "ok", "started": "ok", "FAILED": "FAIL", "not run": "skip", "no-op": "no-op"}


# --- results ----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    block: Block
    line: int
    written: str  # the command as the documentation writes it (continuations joined)
    ran: str = ""  # the command as run, after the rewrites
    status: str = "ok"  # ok | FAILED | not run | no-op | started
    why: str = ""
    seconds: float = 0.0
    stderr: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAILED"

    def describe(self) -> str:
        text = f"{self.block.id} (line {self.line}): {self.written}"
        if self.ran and self.ran != self.written:
            text += f"\n  ran: {self.ran}"
        text += f"\n  {self.why}"
        lines = self.stderr.rstrip().split("\n") if self.stderr.strip() else []
        first_error = next((line for line in lines[:-15] if "error:" in line), None)
        if first_error:  # a wrapper's summary (torchrun's) can push the cause out of the tail
            text += f"\n  first error: {first_error.strip()}"
        if lines:
            text += "\n  stderr (tail):\n" + "\n".join("    " + line for line in lines[-15:])
        return text

    def row(self) -> str:
        mark = MARKS[self.status]
        note = f"  [{self.why}]" if self.status in ("not run", "no-op") else ""
        return (
            f"  {mark:<5} {self.seconds:6.1f}s  {self.block.id:<16} line {self.line:<4} {self.written}{note}"
        )


@dataclass
class FileResult:
    path: str
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    outcome: Outcome
    log: Path


# --- running a file ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_line(text: str) -> str:
    return text if "\n" in text.strip() else re.sub(r"\s+", " ", text).strip()


def run_process(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    stdin: str,
    timeout: float,
    keep_daemons: bool = False,
    drain: float = DRAIN_TIMEOUT,
) -> tuple[int | None, str, str, float]:
    """(exit status or None on a timeout, stdout, stderr, seconds). The command gets a process group of its
    own, so nothing it started in the background outlives it (unless `keep_daemons`, for `ray start`, once
    it has exited). A process it started in a session of its own would hold its pipes after the group is
    killed, and a plain communicate() would wait for it for ever: its output is given up `drain` seconds
    after the kill, and stderr says so."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    code: int | None
    try:
        stdout, stderr = proc.communicate(stdin, timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            stdout, stderr = proc.communicate(timeout=drain)
        except subprocess.TimeoutExpired:
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            proc.wait()
            stdout, stderr = (
                "",
                (
                    "(output lost: a process it started outside its process group still held its stdout or"
                    f" stderr {drain:.0f} s after it was killed)"
                ),
            )
    if code is None or not keep_daemons:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return code, stdout, stderr, time.monotonic() - started


class DocRun:
    """The scratch directory, environment and state the documentation's commands share, file after file."""

    def __init__(self, root: Path) -> None:
        from tunery.cli import build_parser  # no torch: the CLI imports commands lazily

        self.root = root
        self.work = root / "work"
        self.work.mkdir(parents=True)
        for name in ("examples", "configs"):
            shutil.copytree(REPO / name, self.work / name)
        for config in (self.work / "configs").glob("*.yaml"):
            config.write_text(config.read_text().replace(BUNDLED, TINY))
        (root / "blocks").mkdir()
        (root / "logs").mkdir()
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
        self.env = inherited | {
            "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(VENV),
            "TUNERY_HOME": str(root / "tunery-home"),
        }
        self.rewriter = Rewriter(cli_spec(build_parser()), workdir=self.work)
        self.results: dict[str, FileResult] = {}
        self.servers: list[Server] = []
        self.ray_started = False  # a `ray start` ran in this file: `ray stop --force` at its end
        self.report: list[str] = []
        # each command's row as it finishes, on the terminal even under pytest's capture: a run that is
        # stopped from outside (CI's time limit) still shows how far it got
        self.progress: Callable[[str], None] = lambda line: None

    # one file, all its blocks in order

    def ensure(self, path: str) -> FileResult:
        if path not in self.results:
            self.results[path] = self._run_file(path)
            self._write_report()
        return self.results[path]

    def _run_file(self, path: str) -> FileResult:
        result = FileResult(path)
        started = time.monotonic()
        self.progress(f"{path}:")
        extraction = extract_blocks((REPO / path).read_text(), path)
        try:
            if path == "README.md":  # the README's tour starts "after make demo"
                setup = Block(path, 0, "bash", 1, "make demo", name="README.md:setup")
                self._add(result, self._make_demo(setup, 1))
            for block in extraction.blocks:
                if block.not_run is not None:
                    self._add(
                        result,
                        [
                            Outcome(
                                block,
                                block.line,
                                f"({block.lang} block)",
                                status="not run",
                                why=block.not_run,
                            )
                        ],
                    )
                elif block.lang == "python":
                    self._add(result, [self._run_python(block)])
                else:
                    for command in split_commands(block.text, block.line):
                        self._add(result, self._run_command(block, command))
        finally:
            for server in self.servers:
                self._add(result, [self._stop(server)])
            self.servers.clear()
            self.rewriter.ports.clear()
            if self.ray_started:  # whatever the file's own `ray stop` did
                self._process([str(VENV / "bin" / "ray"), "stop", "--force"], "", COMMAND_TIMEOUT)
                self.ray_started = False
        result.seconds = time.monotonic() - started
        return result

    def _add(self, result: FileResult, outcomes: list[Outcome]) -> None:
        result.outcomes += outcomes
        for outcome in outcomes:
            self.progress(outcome.row())

    def _run_command(self, block: Block, command: Command) -> list[Outcome]:
        written = one_line(command.text) + (f"  # {command.comment}" if command.expect_failure else "")
        plan = self.rewriter.plan(command, free_port())
        if plan.kind == "make demo":
            return self._make_demo(block, command.line)
        outcome = Outcome(block, command.line, written, plan.text)
        if plan.kind in ("not run", "no-op", "noop"):
            outcome.status, outcome.why = ("no-op" if plan.kind == "noop" else "not run"), plan.why
            return [outcome]
        if plan.kind == "serve":
            return [self._start(outcome, plan)]
        return [self._execute(outcome, plan, command.expect_failure)]

    def _make_demo(self, block: Block, line: int) -> list[Outcome]:
        venv_bin, python = str(VENV / "bin"), str(VENV / "bin" / "python")
        outcomes = []
        for recipe_line in make_target((REPO / "Makefile").read_text(), "demo", venv_bin, python):
            plan = self.rewriter.plan(Command(recipe_line, line))
            written = "make demo: " + recipe_line.replace(venv_bin + "/", "")
            outcomes.append(
                self._execute(Outcome(block, line, written, plan.text), plan, expect_failure=False)
            )
        return outcomes

    def _execute(self, outcome: Outcome, plan: Plan, expect_failure: bool) -> Outcome:
        daemons = plan.text.lstrip().startswith("ray start")  # the Ray cluster must outlive the command
        self.ray_started = self.ray_started or daemons
        code, stdout, stderr, outcome.seconds = self._process(
            ["bash", "-o", "pipefail", "-c", plan.text], plan.stdin, COMMAND_TIMEOUT, keep_daemons=daemons
        )
        outcome.stderr = stderr or stdout
        if code is None:
            outcome.status, outcome.why = "FAILED", f"timed out after {COMMAND_TIMEOUT:.0f} s"
        elif expect_failure and code == 0:
            outcome.status, outcome.why = "FAILED", "exit 0, but the line is marked `fails:`"
        elif not expect_failure and code != 0:
            outcome.status, outcome.why = "FAILED", f"exit {code} (expected 0)"
        elif "Traceback" in stderr:
            outcome.status, outcome.why = "FAILED", f"exit {code}, with a Python traceback in stderr"
        else:
            outcome.why = f"exit {code}"
            self.rewriter.keep_key(plan, stdout)
        return outcome

    def _run_python(self, block: Block) -> Outcome:
        source = self.rewriter.text(block.text)
        script = self.root / "blocks" / f"{block.path.replace('/', '_')}-{block.index}.py"
        script.write_text(source)
        outcome = Outcome(
            block, block.line, f"(python block, {len(block.text.splitlines())} lines)", str(script)
        )
        code, stdout, stderr, outcome.seconds = self._process(
            [str(VENV / "bin" / "python"), str(script)], "", PYTHON_TIMEOUT
        )
        outcome.stderr = stderr or stdout
        if code is None:
            outcome.status, outcome.why = "FAILED", f"timed out after {PYTHON_TIMEOUT:.0f} s"
        elif code != 0 or "Traceback" in stderr:
            outcome.status, outcome.why = "FAILED", f"exit {code} (expected 0, no traceback)"
        return outcome

    def _process(
        self, argv: list[str], stdin: str, timeout: float, keep_daemons: bool = False
    ) -> tuple[int | None, str, str, float]:
        return run_process(argv, self.work, self.env, stdin, timeout, keep_daemons)

    # the service

    def _start(self, outcome: Outcome, plan: Plan) -> Outcome:
        log = self.root / "logs" / f"serve-{outcome.block.path.replace('/', '_')}-{outcome.line}.log"
        port = int(re.findall(r"--port (\d+)", plan.text)[-1])
        started = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", plan.text],
                cwd=self.work,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        outcome.status, outcome.why = "started", f"serving on port {port} (documented {plan.doc_port})"
        while time.monotonic() - started < SERVER_START_TIMEOUT:
            if proc.poll() is not None:
                outcome.status, outcome.why = (
                    "FAILED",
                    f"tunery serve exited {proc.returncode} before answering",
                )
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                    break
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            outcome.status, outcome.why = (
                "FAILED",
                f"no answer to GET /v1/models in {SERVER_START_TIMEOUT:.0f} s",
            )
        outcome.seconds = time.monotonic() - started
        if outcome.failed:
            outcome.stderr = log.read_text(errors="replace")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            self.rewriter.ports[plan.doc_port] = port
            self.servers.append(Server(proc, outcome, log))
        return outcome

    def _stop(self, server: Server) -> Outcome:
        """SIGTERM to the server's group (jobs checkpoint and stop), SIGKILL after a minute; then its log."""
        started = time.monotonic()
        outcome = Outcome(server.outcome.block, server.outcome.line, "(stop) " + server.outcome.written)
        try:
            os.killpg(server.process.pid, signal.SIGTERM)
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
            outcome.status, outcome.why = "FAILED", "tunery serve did not stop within 60 s of SIGTERM"
        except ProcessLookupError:
            pass
        log = server.log.read_text(errors="replace")
        if "Traceback" in log and not outcome.failed:
            outcome.status, outcome.why = "FAILED", f"the server's log ({server.log}) has a Python traceback"
            outcome.stderr = log[log.index("Traceback") :][:4000]
        outcome.seconds = time.monotonic() - started
        return outcome

    def stop_all(self) -> None:
        for server in self.servers:
            self._stop(server)
        self.servers.clear()

    # the report

    def _write_report(self) -> None:
        lines = [f"Documentation commands (scratch directory {self.work}):"]
        for result in self.results.values():
            failed = sum(o.failed for o in result.outcomes)
            lines.append(
                f"{result.path}: {len(result.outcomes)} commands, {failed} failed, {result.seconds:.0f} s"
            )
            lines += [o.row() for o in result.outcomes]
        total = sum(r.seconds for r in self.results.values())
        lines.append(f"total: {total:.0f} s")
        self.report[:] = lines
        (self.root / "report.txt").write_text("\n".join(lines) + "\n")


# --- tests ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[DocRun]:
    run = DocRun(tmp_path_factory.mktemp("docs-commands"))
    request.config.stash[REPORT_KEY] = run.report
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def progress(line: str) -> None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(line, flush=True)

    run.progress = progress
    try:
        yield run
    finally:
        run.stop_all()


@pytest.mark.parametrize("path", DOC_FILES)
def test_every_command_runs(doc_run: DocRun, path: str) -> None:
    for earlier in DOC_FILES[: DOC_FILES.index(path)]:
        doc_run.ensure(earlier)  # what this file's commands may build on
    result = doc_run.ensure(path)
    failures = [o for o in result.outcomes if o.failed]
    ran = sum(o.status not in ("not run", "no-op") for o in result.outcomes)
    assert not failures, f"{len(failures)} of {ran} commands in {path} failed:\n\n" + "\n\n".join(
        o.describe() for o in failures
    )


def test_documentation_marks_what_it_does_not_run(request: pytest.FixtureRequest) -> None:
    """Every skipped block says why, and nothing that looks like a command is skipped without a marker."""
    problems, listed = [], ["Blocks marked not run:"]
    for path in DOC_FILES:
        extraction = extract_blocks((REPO / path).read_text(), path)
        problems += extraction.problems
        for block in extraction.blocks:
            if block.not_run is not None:
                listed.append(f"  {block.id} (line {block.line}): {block.not_run or '(no reason)'}")
                if not block.not_run:
                    problems.append(f"{block.id} (line {block.line}): `<!-- not run: -->` needs a reason")
    print("\n".join(listed))
    assert not problems, "\n".join(problems)


def test_a_command_whose_child_holds_its_output_still_times_out(tmp_path: Path) -> None:
    """The harness cannot hang on a command that leaves a process of another session holding its pipes
    (CI once stopped at its time limit inside this test with nothing printed)."""
    pid_file = tmp_path / "pid"
    script = f"echo started; setsid sleep 120 & echo $! > {pid_file}; sleep 120"
    try:
        code, stdout, stderr, seconds = run_process(
            ["bash", "-c", script], tmp_path, dict(os.environ), "", timeout=1.0, drain=1.0
        )
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert code is None
    assert seconds < 30
    assert "output lost" in stderr and stdout == ""
