from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

TOPICS = [
    ("Where is my order?", "You can track it from the link in your confirmation email."),
    ("Can I return a bike?", "Yes, within 30 days if it is unused."),
    ("Do you ship abroad?", "We ship to the US and Canada only."),
    ("What are your hours?", "Monday to Friday, 8am to 6pm Pacific."),
    ("Is there a warranty?", "Frames have a 5-year warranty."),
    ("How do I cancel?", "Reply CANCEL to your confirmation email within 2 hours."),
    ("Do you price match?", "Yes, for identical items from authorised dealers."),
    ("Can I pay later?", "Yes, in four payments with no interest."),
]


def chat_lines(n: int, multi_turn_every: int = 3) -> list[dict]:
    """n small, distinct chats; every `multi_turn_every`-th is two turns, some with a weight-0 turn."""
    lines = []
    for i in range(n):
        q, a = TOPICS[i % len(TOPICS)]
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"{q} (#{i})"},
            {"role": "assistant", "content": a},
        ]
        if i % multi_turn_every == 0:
            q2, a2 = TOPICS[(i + 1) % len(TOPICS)]
            if i % 2 == 0:
                messages[-1]["weight"] = 0
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        lines.append({"messages": messages})
    return lines


BAD_ANSWERS = [
    "No idea.",
    "Figure it out yourself, it is all on the website somewhere I think.",
    "Sure, free!",
]


def pair_lines(n: int, openai_format: bool = True) -> list[dict]:
    """n distinct preference pairs: the TOPICS answer is preferred over a rude, rambling or wrong one."""
    lines = []
    for i in range(n):
        q, good = TOPICS[i % len(TOPICS)]
        bad = BAD_ANSWERS[i % len(BAD_ANSWERS)]
        prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{q} (#{i})"}]
        if openai_format:
            lines.append(
                {
                    "input": {"messages": prompt},
                    "preferred_output": [{"role": "assistant", "content": good}],
                    "non_preferred_output": [{"role": "assistant", "content": bad}],
                }
            )
        else:
            lines.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return lines


def thumbs_lines(n: int) -> list[dict]:
    """n unpaired ratings, alternating a good answer (thumbs up) and a bad one (down)."""
    lines = []
    for i in range(n):
        q, good = TOPICS[i % len(TOPICS)]
        up = i % 2 == 0
        answer = good if up else BAD_ANSWERS[i % len(BAD_ANSWERS)]
        lines.append({"prompt": f"{q} (#{i})", "completion": answer, "label": up})
    return lines


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(autouse=True)
def tunery_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.getbasetemp() / "tunery-home"
    monkeypatch.setenv("TUNERY_HOME", str(home))
    return home


@pytest.fixture
def pair_files(tmp_path: Path) -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "pairs.jsonl", pair_lines(24))
    valid = write_jsonl(tmp_path / "pairs-valid.jsonl", pair_lines(30)[24:])
    return train, valid


@pytest.fixture
def chat_files(tmp_path: Path) -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "train.jsonl", chat_lines(24))
    valid = write_jsonl(tmp_path / "valid.jsonl", chat_lines(30)[24:])
    return train, valid


@pytest.fixture
def tiny():
    """A fresh tiny-random model and tokenizer (peft wraps models in place, so never share one)."""
    from tunery.models.load import load_model

    return load_model("tiny-random")


def nudged_lora(model):  # type: ignore[no-untyped-def]
    """`model` with a rank-4 LoRA adapter on every linear layer, its B matrices nudged off zero (so the
    adapter changes the output)."""
    import torch

    from tunery.models.lora import apply_lora

    peft = apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="all-linear")
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return peft


# a chat a tiny model learns in a few steps: the same answer to every question
BLUE_LINES = [
    {
        "messages": [
            {"role": "user", "content": f"Colour number {i}?"},
            {"role": "assistant", "content": "Blue."},
        ]
    }
    for i in range(16)
]


def example_module(path: Path) -> types.ModuleType:
    """A script under examples/ imported as a module (examples are not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tunery_here(args: list[str], stdin: str = "") -> str:
    """`tunery ARGS` in this process, through the CLI's own entry (`main`); it must succeed. Returns what
    it printed. Cheaper than a fresh process by its imports (~4 s a command); the commands the README
    shows run as processes in tests/docs."""
    from tunery.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            code = main(args)
        finally:
            sys.stdin = old_stdin
    assert code == 0, err.getvalue()[-2000:]
    return out.getvalue()


def metric_series(run: Path, key: str) -> list[float]:
    """`key` in each line of a run's metrics.jsonl that has it."""
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def _launch(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


RANK_SCRIPT = str(Path(__file__).with_name("torchrun_rank.py"))  # `tunery` with a stack dump on SIGUSR1


def run_two_nodes(args: list[str], timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """Two torchrun launches of one process each, as two nodes of a cluster would run them (README, "On a
    cluster"): `torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`, here
    both on 127.0.0.1. Each launch's outcome; on a hang, where each rank waited (`_stop_hung`)."""
    import socket

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun ships with torch"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tunery-test", RANK_SCRIPT, *args]  # fmt: skip
    with _stack_dir() as stacks:
        procs = [_launch(launch, {"TUNERY_TEST_STACKS": str(stacks)}) for _ in range(2)]
        results = []
        deadline = time.monotonic() + timeout
        try:
            for proc in procs:
                stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
        except subprocess.TimeoutExpired:
            dumps = _stop_hung([proc.pid for proc in procs], stacks)
            raise AssertionError(f"two-node torchrun hung for {timeout:.0f} s; {dumps}") from None
    return results


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


@contextlib.contextmanager
def _stack_dir() -> Iterator[Path]:
    """A directory for the ranks' stack files (tests/torchrun_rank.py), removed afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tunery-stacks-") as stacks:
        yield Path(stacks)


def _stop_hung(launchers: list[int], stacks: Path) -> str:
    """Stop hung torchrun launchers: each rank below them (in a session of its own) is sent SIGUSR1 and
    writes every thread's stack to a file of its own, then launchers and ranks are killed. Returns the
    stacks, rank by rank: dumps through one shared stderr interleave and cannot be told apart."""
    ranks = [pid for launcher in launchers for pid in _descendants(launcher)]
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    time.sleep(3)
    for pid in [*launchers, *ranks]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    files = sorted(stacks.glob("rank*.txt"))
    return "where each rank waited:\n" + "\n".join(
        f"--- {f.stem} ---\n{f.read_text()[-12000:]}" for f in files
    )


def run_torchrun(
    args: list[str], timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc_per_node=2 -m tunery ARGS` from the repository root (`env`: variables
    added to the environment), each rank through tests/torchrun_rank.py. On a hang, where each rank waited
    (`_stop_hung`): a hung run fails with its stacks instead of leaving ranks behind."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun ships with torch"
    with _stack_dir() as stacks:
        command = [torchrun, "--standalone", "--nproc_per_node=2", RANK_SCRIPT, *args]
        proc = _launch(command, {**(env or {}), "TUNERY_TEST_STACKS": str(stacks)})
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            dumps = _stop_hung([proc.pid], stacks)
            stdout, stderr = proc.communicate()
            raise AssertionError(
                f"torchrun hung for {timeout:.0f} s; {dumps}\nstderr:\n{stderr[-3000:]}"
            ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
