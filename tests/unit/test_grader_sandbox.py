"""The Python grader sandbox against hostile code: each attack scores 0 with an error and the batch goes on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunery.graders.sandbox import SandboxLimits, run_python_batch, sandbox_info

LIMITS = SandboxLimits(timeout=20, file_bytes=8 * 2**20)


def grade_one(
    source: str, limits: SandboxLimits = LIMITS, sample: dict | None = None
) -> tuple[float | None, str]:
    [outcome] = run_python_batch(source, [(sample or {"output_text": "x"}, {})], limits)
    return outcome.score, f"{outcome.kind}: {outcome.error}"


def test_normal_code_with_the_standard_library_and_numpy_works() -> None:
    source = (
        "import json, math, re, collections, statistics, datetime, subprocess\n"
        "import numpy as np\n"
        "def grade(sample, item):\n"
        "    numbers = [float(n) for n in re.findall(r'\\d+', sample['output_text'])]\n"
        "    return math.sqrt(float(np.mean(numbers))) / item['scale']\n"
    )
    outcomes = run_python_batch(
        source, [({"output_text": "2 and 6"}, {"scale": 2}), ({"output_text": "9"}, {"scale": 3})]
    )
    assert [o.score for o in outcomes] == [1.0, 1.0]


def test_scratch_directory_is_the_writable_cwd_and_is_deleted_afterwards() -> None:
    source = (
        "import os, tempfile\n"
        "def grade(sample, item):\n"
        "    open('notes.txt', 'w').write('x' * 10)\n"
        "    os.makedirs('sub/dir')\n"
        "    tempfile.mkstemp()\n"
        "    raise RuntimeError(os.getcwd() + '|' + os.environ['HOME'] + '|' + ','.join(sorted(os.environ)))\n"
    )
    score, error = grade_one(source)
    cwd, home, names = error.split("RuntimeError: ")[1].split("\n")[0].split("|")
    assert score is None and cwd == home and Path(cwd).name.startswith("tunery-grader-")
    assert not Path(cwd).exists()
    assert "TUNERY_HOME" not in names and "PATH" in names  # a clean environment


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        (
            "read /etc/passwd",
            "def grade(s, i):\n    return len(open('/etc/passwd').read())\n",
            "reading /etc/passwd",
        ),
        ("list /root", "import os\ndef grade(s, i):\n    return len(os.listdir('/root'))\n", "listing /root"),
        (
            "socket",
            "import socket\ndef grade(s, i):\n    socket.socket().connect(('127.0.0.1', 9))\n",
            "blocked in the grader sandbox: socket",
        ),
        (
            "os.system",
            "import os\ndef grade(s, i):\n    return float(os.system('true'))\n",
            "blocked in the grader sandbox: os.system",
        ),
        (
            "subprocess",
            "import subprocess\ndef grade(s, i):\n    subprocess.run(['true'])\n",
            "blocked in the grader sandbox: subprocess.Popen",
        ),
        (
            "exec",
            "import os\ndef grade(s, i):\n    os.execv('/bin/true', ['true'])\n",
            "blocked in the grader sandbox: os.exec",
        ),
        ("ctypes", "import ctypes\ndef grade(s, i):\n    return 1.0\n", "import ctypes"),
        (
            "fork bomb",
            "import os\ndef grade(s, i):\n    while True:\n        os.fork()\n",
            "blocked in the grader sandbox: os.fork",
        ),
        (
            "kill",
            "import os\ndef grade(s, i):\n    os.kill(1, 9)\n",
            "blocked in the grader sandbox: os.kill",
        ),
        ("memory bomb", "def grade(s, i):\n    x = bytearray(8 * 2**30)\n    return 1.0\n", "MemoryError"),
        (
            "huge file",
            "def grade(s, i):\n    with open('big', 'wb') as f:\n        for _ in range(64):\n            f.write(bytes(2**20))\n",
            "File too large",
        ),
        ("symlink out", "import os\ndef grade(s, i):\n    os.symlink('/etc/passwd', 'p')\n", "os.symlink"),
        ("gc escape", "import gc\ndef grade(s, i):\n    gc.get_objects()\n", "gc.get_objects"),
        (
            "patch the hook",
            "import sys\ndef grade(s, i):\n    sys.settrace(lambda *a: None)\n",
            "blocked in the grader sandbox: sys.settrace",
        ),
        (
            "lying str subclass",
            "class P(str):\n    def startswith(self, *a):\n        return True\n"
            "def grade(s, i):\n    return len(open(P('/etc/passwd')).read())\n",
            "reading /etc/passwd",
        ),
    ],
)
def test_hostile_code_fails_with_an_error(name: str, source: str, expected: str) -> None:
    score, error = grade_one(source)
    assert score is None and error.startswith("runtime: ") and expected in error, (name, error)


def test_reading_a_file_outside_the_scratch_dir_fails(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    score, error = grade_one(f"def grade(s, i):\n    return len(open({str(secret)!r}).read())\n")
    assert score is None and f"reading {secret}" in error
    score, error = grade_one(f"def grade(s, i):\n    open({str(tmp_path / 'out.txt')!r}, 'w')\n")
    assert score is None and "writing" in error and not (tmp_path / "out.txt").exists()


def test_infinite_loop_is_killed_at_the_timeout() -> None:
    started = time.monotonic()
    outcomes = run_python_batch(
        "def grade(s, i):\n    if s['output_text'] == 'ok':\n        return 1.0\n    while True:\n        pass\n",
        [({"output_text": "ok"}, {}), ({"output_text": "loop"}, {}), ({"output_text": "ok"}, {})],
        SandboxLimits(timeout=1.5),
    )
    assert time.monotonic() - started < 5
    assert outcomes[0].score == 1.0  # graded before the loop started
    assert [o.kind for o in outcomes[1:]] == ["timeout", "timeout"]


def test_a_sample_that_kills_the_process_loses_only_itself() -> None:
    source = "import os\ndef grade(s, i):\n    if s['output_text'] == 'die':\n        os._exit(3)\n    return 1.0\n"
    pairs = [({"output_text": t}, {}) for t in ("ok", "die", "ok", "die", "ok")]
    outcomes = run_python_batch(source, pairs, LIMITS)
    assert [o.score for o in outcomes] == [1.0, None, 1.0, None, 1.0]
    assert outcomes[1].kind == "crash" and "exited with status 3" in (outcomes[1].error or "")


def test_bad_return_values_and_import_failures_are_runtime_errors() -> None:
    source = "def grade(s, i):\n    return {'str': 'a', 'nan': float('nan'), 'inf': float('inf'), 'none': None, 'exit': exit}[s['output_text']]\n"
    outcomes = run_python_batch(
        source, [({"output_text": k}, {}) for k in ("str", "nan", "inf", "none")], LIMITS
    )
    assert all(o.score is None and o.kind == "runtime" for o in outcomes)
    [broken] = run_python_batch("import not_a_module\ndef grade(s, i):\n    return 1.0\n", [({}, {})], LIMITS)
    assert "loading the grader failed: ModuleNotFoundError" in (broken.error or "")


def test_sandbox_reports_its_kernel_layers() -> None:
    info = sandbox_info()
    assert info["ready"] is True
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert info["seccomp"] is True


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="seccomp filter is x86-64 only"
)
def test_seccomp_filter_refuses_processes_and_sockets_in_the_kernel() -> None:
    """Below the audit hook: with the filter alone, fork/exec/socket fail with EPERM/EACCES, threads work."""
    runner = Path(__file__).resolve().parents[2] / "tunery" / "graders" / "_runner.py"
    code = (
        f"import sys, os, socket, threading; sys.path.insert(0, {str(runner.parent)!r}); import _runner\n"
        "assert _runner._seccomp_filter()\n"
        "for name, fn in [('fork', os.fork), ('socket', socket.socket), ('exec', lambda: os.execv('/bin/true', ['true'])),\n"
        "                 ('kill', lambda: os.kill(1, 0))]:\n"
        "    try:\n        fn(); print(name, 'allowed')\n"
        "    except OSError as e:\n        print(name, 'refused', e.errno)\n"
        "t = threading.Thread(target=lambda: print('thread ran')); t.start(); t.join()\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.defpath},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:5] == [
        "fork refused 1",
        "socket refused 13",
        "exec refused 1",
        "kill refused 1",
        "thread ran",
    ]


def test_garbage_on_the_result_channel_is_ignored() -> None:
    source = (
        "import os\n"
        "def grade(s, i):\n"
        "    for fd in range(3, 8):\n"
        "        try:\n"
        '            os.write(fd, b\'not json\\n{"i": 99, "score": 1}\\n{"i": "x"}\\n\')\n'
        "        except OSError:\n"
        "            pass\n"
        "    return 0.5\n"
    )
    outcomes = run_python_batch(source, [({}, {}), ({}, {})], LIMITS)
    assert [o.score for o in outcomes] == [0.5, 0.5]
