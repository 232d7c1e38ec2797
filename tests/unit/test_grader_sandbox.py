"""The Python grader sandbox against hostile code: each attack scores 0 with an error and the batch goes on.

The kernel layers (bubblewrap's namespaces, the noexec scratch, no capabilities, seccomp) are tested with
native code too: a C extension compiled here with the system compiler, and ctypes calls made inside the
sandbox with the Python-level hook left out, as an attacker's native code would.
"""

from __future__ import annotations

import base64
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tunery.graders import sandbox
from tunery.graders.sandbox import (
    SandboxLimits,
    SandboxStatus,
    SandboxUnavailable,
    run_python_batch,
    sandbox_info,
    sandbox_status,
)

LIMITS = SandboxLimits(timeout=20, file_bytes=8 * 2**20)
# CI sets this: there a missing sandbox is a failure, not a skip
REQUIRED = os.environ.get("TUNERY_TEST_REQUIRE_SANDBOX") == "1"
confined = pytest.mark.skipif(
    not REQUIRED and not sandbox_status().confined,
    reason=f"no kernel sandbox here: {sandbox_status().detail}",
)


def grade_one(
    source: str, limits: SandboxLimits = LIMITS, sample: dict | None = None
) -> tuple[float | None, str]:
    [outcome] = run_python_batch(source, [(sample or {"output_text": "x"}, {})], limits)
    return outcome.score, f"{outcome.kind}: {outcome.error}"


@confined
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


@confined
def test_scratch_is_the_writable_cwd_and_each_process_gets_a_fresh_one() -> None:
    source = (
        "import os, tempfile\n"
        "def grade(sample, item):\n"
        "    before = os.listdir('.')\n"
        "    open('notes.txt', 'w').write('x' * 10)\n"
        "    os.makedirs('sub/dir')\n"
        "    tempfile.mkstemp()\n"
        "    raise RuntimeError(os.getcwd() + '|' + os.environ['HOME'] + '|' + ','.join(sorted(os.environ)) + '|' + str(before))\n"
    )
    for _ in range(2):  # the second process does not see the first one's files
        score, error = grade_one(source)
        cwd, home, names, before = error.split("RuntimeError: ")[1].split("\n")[0].split("|")
        assert score is None and cwd == home == "/scratch" and before == "[]"
        assert "TUNERY_HOME" not in names and "PATH" in names  # a clean environment


@confined
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
            "thread bomb",
            "import threading\ndef grade(s, i):\n    threading.Thread(target=print).start()\n",
            "can't start new thread",  # the kernel's refusal (seccomp): Python has no audit event for it
        ),
        (
            "huge file",
            "def grade(s, i):\n    with open('big', 'wb') as f:\n        for _ in range(64):\n            f.write(bytes(2**20))\n",
            "File too large",
        ),
        ("symlink out", "import os\ndef grade(s, i):\n    os.symlink('/etc/passwd', 'p')\n", "os.symlink"),
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


@confined
def test_reading_a_file_outside_the_scratch_dir_fails(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    score, error = grade_one(f"def grade(s, i):\n    return len(open({str(secret)!r}).read())\n")
    assert score is None and f"reading {secret}" in error
    score, error = grade_one(f"def grade(s, i):\n    open({str(tmp_path / 'out.txt')!r}, 'w')\n")
    assert score is None and "writing" in error and not (tmp_path / "out.txt").exists()


@confined
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
    assert _sandboxes_alive() == []  # the grader inside bubblewrap's session is gone too


def _sandboxes_alive() -> list[int]:
    """Processes running the grader runner (its source is their command line)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"def _seccomp_filter" in (entry / "cmdline").read_bytes():
                    alive.append(int(entry.name))
            except OSError:
                continue
    return alive


@confined
def test_a_sample_that_kills_the_process_loses_only_itself() -> None:
    source = "import os\ndef grade(s, i):\n    if s['output_text'] == 'die':\n        os._exit(3)\n    return 1.0\n"
    pairs = [({"output_text": t}, {}) for t in ("ok", "die", "ok", "die", "ok")]
    outcomes = run_python_batch(source, pairs, LIMITS)
    assert [o.score for o in outcomes] == [1.0, None, 1.0, None, 1.0]
    assert outcomes[1].kind == "crash" and "exited with status 3" in (outcomes[1].error or "")


@confined
def test_bad_return_values_and_import_failures_are_runtime_errors() -> None:
    source = "def grade(s, i):\n    return {'str': 'a', 'nan': float('nan'), 'inf': float('inf'), 'none': None, 'exit': exit}[s['output_text']]\n"
    outcomes = run_python_batch(
        source, [({"output_text": k}, {}) for k in ("str", "nan", "inf", "none")], LIMITS
    )
    assert all(o.score is None and o.kind == "runtime" for o in outcomes)
    [broken] = run_python_batch("import not_a_module\ndef grade(s, i):\n    return 1.0\n", [({}, {})], LIMITS)
    assert "loading the grader failed: ModuleNotFoundError" in (broken.error or "")


@confined
def test_sandbox_reports_its_kernel_layers() -> None:
    info = sandbox_info()
    assert info["ready"] is True and info["confined"] is True
    assert info["namespaces"] == "user+mount+pid+net+ipc+uts+cgroup"
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert info["seccomp"] is True
    assert sandbox_status().confined and sandbox_status().detail.startswith("bubblewrap")


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="seccomp filter is x86-64 only"
)
def test_seccomp_filter_refuses_processes_and_sockets_in_the_kernel() -> None:
    """Below the audit hook: with the filter alone, fork/exec/socket/threads fail with EPERM/EACCES. Threads
    too: as root a grader is not held by RLIMIT_NPROC, and thousands of threads would use up the machine's
    process ids (an attack that made 2,881 threads in one grader)."""
    runner = Path(__file__).resolve().parents[2] / "tunery" / "graders" / "_runner.py"
    code = (
        f"import sys, os, socket, threading; sys.path.insert(0, {str(runner.parent)!r}); import _runner\n"
        "assert _runner._seccomp_filter()\n"
        "for name, fn in [('fork', os.fork), ('socket', socket.socket), ('exec', lambda: os.execv('/bin/true', ['true'])),\n"
        "                 ('kill', lambda: os.kill(1, 0))]:\n"
        "    try:\n        fn(); print(name, 'allowed')\n"
        "    except OSError as e:\n        print(name, 'refused', e.errno)\n"
        "try:\n    threading.Thread(target=lambda: print('thread ran')).start()\n"
        "except RuntimeError as e:\n    print('thread refused', e)\n"
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
        "thread refused can't start new thread",
    ]


@confined
def test_garbage_on_the_result_channel_is_ignored() -> None:
    source = (
        "import os\n"
        "def grade(s, i):\n"
        "    for fd in range(3, 8):\n"
        "        try:\n"
        '            os.write(fd, b\'not json\\n{"i": 99, "score": 1}\\n{"i": "x"}\\n\')\n'
        # a parser-breaking depth, a number no float holds, NaN: ignored, never a crash of the caller
        "            os.write(fd, b'[' * 200000 + b'\\n{\"i\": 1, \"score\": 1' + b'0' * 400 + b'}\\n')\n"
        '            os.write(fd, b\'{"i": 1, "score": NaN}\\n\')\n'
        "        except OSError:\n"
        "            pass\n"
        "    return 0.5\n"
    )
    outcomes = run_python_batch(source, [({}, {}), ({}, {})], LIMITS)
    assert [o.score for o in outcomes] == [0.5, 0.5]


# --- the kernel's layers ----------------------------------------------------------------------------------

EXTENSION_C = r"""
#include <Python.h>
#include <fcntl.h>
#include <unistd.h>

static PyObject *read_file(PyObject *self, PyObject *args) {
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) return NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    char buffer[65536];
    ssize_t n = read(fd, buffer, sizeof buffer);
    close(fd);
    return PyBytes_FromStringAndSize(buffer, n < 0 ? 0 : n);
}

static PyObject *write_file(PyObject *self, PyObject *args) {
    const char *path, *text;
    if (!PyArg_ParseTuple(args, "ss", &path, &text)) return NULL;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    ssize_t n = write(fd, text, strlen(text));
    close(fd);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef methods[] = {
    {"read_file", read_file, METH_VARARGS, NULL},
    {"write_file", write_file, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "evil", NULL, -1, methods};
PyMODINIT_FUNC PyInit_evil(void) { return PyModule_Create(&module); }
"""


@pytest.fixture(scope="module")
def evil_extension(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A C extension that calls libc open/read/write directly, past any Python-level check."""
    compiler = sysconfig.get_config_var("CC") or "cc"
    include = sysconfig.get_path("include")
    if not Path(include, "Python.h").is_file():
        pytest.skip("no Python headers to compile an extension against")
    directory = tmp_path_factory.mktemp("evil")
    (directory / "evil.c").write_text(EXTENSION_C)
    target = directory / "evil.so"
    command = [*compiler.split()[:1], "-shared", "-fPIC", "-O0", f"-I{include}", "evil.c", "-o", str(target)]
    try:
        built = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip(f"no C compiler ({command[0]})")
    assert built.returncode == 0, built.stderr
    return target


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """Another project's data, readable by the user that runs Tunery."""
    path = tmp_path / "data" / "files" / "file-other-project"
    path.parent.mkdir(parents=True)
    path.write_text("patient notes: s3cret")
    return path


@confined
def test_a_compiled_extension_written_to_scratch_cannot_be_loaded(evil_extension: Path, secret: Path) -> None:
    """The escape that read another project's file and wrote a .pth into the venv: now the extension
    cannot even be mapped (the scratch is noexec), and the paths do not exist in the sandbox anyway."""
    blob = base64.b64encode(evil_extension.read_bytes()).decode()
    source = (
        "import base64, importlib.util\n"
        f"BLOB = {blob!r}\n"
        "def grade(sample, item):\n"
        "    open('evil.so', 'wb').write(base64.b64decode(BLOB))\n"
        "    spec = importlib.util.spec_from_file_location('evil', '/scratch/evil.so')\n"
        "    evil = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(evil)\n"
        f"    return float(len(evil.read_file({str(secret)!r})))\n"
    )
    score, error = grade_one(source)
    assert score is None and "failed to map segment from shared object" in error, error
    assert "s3cret" not in error


SANDBOXED_NATIVE_ATTACK = r"""
import ctypes, errno, json, os, pwd, socket, sys
import ctypes.util

RUNNER = {runner!r}
exec(RUNNER.replace('if __name__ == "__main__":\n    main()', ''))
_confine("/scratch")  # exactly the set-up the runner does before user code, without the audit hook
assert _seccomp_filter()
libc = ctypes.CDLL(None, use_errno=True)
libc.open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
found = {{}}

def native_open(path, flags=os.O_RDONLY):
    fd = libc.open(path.encode(), flags | os.O_CLOEXEC, 0o644)
    return "ok" if fd >= 0 else errno.errorcode[ctypes.get_errno()]

for name, path in {reads!r}.items():
    found["read " + name] = native_open(path)
for name, path in {writes!r}.items():
    found["write " + name] = native_open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
try:
    os.stat({secret!r})
    found["stat secret"] = "ok"
except OSError as e:
    found["stat secret"] = errno.errorcode[e.errno]
found["users"] = [p.pw_name for p in pwd.getpwall()]
found["proc"] = os.listdir("/proc")
found["mount tmpfs"] = "ok" if libc.mount(b"x", b"/scratch", b"tmpfs", 0, None) == 0 else errno.errorcode[ctypes.get_errno()]
found["unshare"] = "ok" if libc.unshare(0x10000000) == 0 else errno.errorcode[ctypes.get_errno()]
header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
libc.capget(header, data)
found["capabilities"] = list(data)
found["memfd"] = "ok" if libc.syscall(319, b"x", 0) >= 0 else errno.errorcode[ctypes.get_errno()]
# System V IPC: a shared-memory segment would hold memory past RLIMIT_AS once detached
for name, nr, args in [("shmget", 29, (0, 1 << 20, 0o1600)), ("semget", 64, (0, 1, 0o600)), ("msgget", 68, (0, 0o600))]:
    found[name] = "ok" if libc.syscall(nr, *args) >= 0 else errno.errorcode[ctypes.get_errno()]
open("/scratch/evil.so", "wb").write(open({extension!r}, "rb").read()) if os.path.exists({extension!r}) else None
try:
    ctypes.CDLL("/scratch/evil.so")
    found["dlopen scratch"] = "ok"
except OSError as e:
    found["dlopen scratch"] = str(e)
print(json.dumps(found))
"""


@confined
def test_native_code_inside_the_sandbox_meets_the_kernel(secret: Path, evil_extension: Path) -> None:
    """Native code (ctypes) under the runner's own set-up, without the audit hook: what it can reach is
    what the kernel lets it, which is nothing of the machine's."""
    venv_site = sysconfig.get_path("purelib")
    reads = {
        "secret": str(secret),
        "shadow": "/etc/shadow",
        "database": str(secret.parent.parent / "tunery.db"),
        "tunery": str(Path(sandbox.__file__)),
    }
    writes = {"pth in venv": f"{venv_site}/evil.pth", "pth in grader site": f"{sandbox.SITE}/evil.pth",
              "etc": "/etc/passwd", "root": "/planted"}  # fmt: skip
    secret.parent.parent.joinpath("tunery.db").write_text("keys")
    # the extension is copied into the sandbox's scratch through a read-only bind made for this test
    code = SANDBOXED_NATIVE_ATTACK.format(
        runner=sandbox._runner_source(), reads=reads, writes=writes, secret=str(secret),
        extension="/evil/evil.so",
    )  # fmt: skip
    out = _run_in_sandbox(code, extra=["--ro-bind", str(evil_extension.parent), "/evil"])
    found = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    for name in reads:
        assert found[f"read {name}"] == "ENOENT", (name, found)
    for name in writes:
        assert found[f"write {name}"] in ("EROFS", "ENOENT", "EACCES"), (name, found)
    assert found["stat secret"] == "ENOENT"
    assert found["users"] == ["grader"]
    assert found["proc"] == []
    assert found["mount tmpfs"] == "EPERM" and found["unshare"] == "EPERM" and found["memfd"] == "EPERM"
    assert found["shmget"] == found["semget"] == found["msgget"] == "EPERM"
    assert found["capabilities"] == [0] * 6
    assert "failed to map segment" in found["dlopen scratch"]
    assert not Path(venv_site, "evil.pth").exists()


@confined
def test_no_network_even_to_the_host_loopback() -> None:
    """A server on the host's 127.0.0.1 (say, `tunery serve`) is unreachable: the sandbox's loopback is
    its own. Checked before seccomp (which refuses sockets altogether), so the namespace alone holds."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')\n"
            "except OSError as e:\n"
            "    print('refused', e.errno)\n"
        )
        out = _run_in_sandbox(code)
        assert out.stdout.startswith("refused"), out
    finally:
        listener.close()


def _run_in_sandbox(code: str, extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """`code` under the very bubblewrap command line the sandbox uses, in place of the runner."""
    fds = []
    for content in sandbox._stub_files():
        read_end, write_end = os.pipe()
        os.write(write_end, content)
        os.close(write_end)
        fds.append(read_end)
    argv = sandbox._bwrap_command("bwrap", LIMITS, (fds[0], fds[1]))
    split = next(k for k in range(len(argv)) if argv[k : k + 2] == ["--remount-ro", "/"])
    argv = [*argv[:split], *(extra or []), *argv[split:]]
    argv[argv.index("-c") + 1] = code
    try:
        out = subprocess.run(argv, pass_fds=fds, capture_output=True, text=True, timeout=60)
    finally:
        for fd in fds:
            os.close(fd)
    assert out.returncode == 0, out.stderr
    return out


@confined
def test_sqlite_cannot_attach_a_database_outside_the_scratch(tmp_path: Path) -> None:
    """The escape that read every key hash and added an admin key: ATTACH from an in-memory database."""
    database = tmp_path / "tunery.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE api_keys (key_hash TEXT)")
        connection.execute("INSERT INTO api_keys VALUES ('abc')")
    for target in (str(database), f"file:{database}?mode=rw"):
        source = (
            "import sqlite3\n"
            "def grade(sample, item):\n"
            "    db = sqlite3.connect(':memory:', uri=True)\n"
            f"    db.execute('ATTACH DATABASE ? AS other', ({target!r},))\n"
            "    db.execute(\"INSERT INTO other.api_keys VALUES ('forged')\")\n"
            "    db.commit()\n"
            "    return float(len(db.execute('SELECT * FROM other.api_keys').fetchall()))\n"
        )
        score, error = grade_one(source)
        assert score is None and "unable to open database" in error, error
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT key_hash FROM api_keys").fetchall() == [("abc",)]


@confined
def test_the_grader_imports_the_offered_packages_and_nothing_else() -> None:
    source = (
        "import numpy, scipy.stats, sympy, yaml, pydantic, rapidfuzz\n"
        "def grade(sample, item):\n"
        "    for name in ('tunery', 'torch', 'fastapi', 'sqlalchemy'):\n"
        "        try:\n"
        "            __import__(name)\n"
        "            raise RuntimeError(name + ' is importable')\n"
        "        except ImportError:\n"
        "            pass\n"
        "    return float(scipy.stats.norm.cdf(0.0) + sympy.Rational(1, 2))\n"
    )
    score, error = grade_one(source)
    assert score == 1.0, error


# --- when the sandbox cannot run -------------------------------------------------------------------------


@pytest.fixture
def no_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    status = SandboxStatus(False, "bubblewrap is not installed (test)")
    monkeypatch.setattr(sandbox, "sandbox_status", lambda: status)
    monkeypatch.delenv(sandbox.UNCONFINED_ENV, raising=False)


def test_without_the_sandbox_python_graders_are_refused_with_the_fix(no_sandbox: None) -> None:
    from tunery.graders import build_grader

    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap|bubblewrap is not installed"):
        run_python_batch("def grade(s, i):\n    return 1.0\n", [({}, {})], LIMITS)
    with pytest.raises(SandboxUnavailable, match="TUNERY_UNCONFINED_GRADERS=1"):
        build_grader({"type": "python", "name": "p", "source": "def grade(s, i):\n    return 1.0\n"})
    # graders that run no user code are unaffected
    build_grader({"type": "string_check", "name": "s", "operation": "eq", "input": "a", "reference": "a"})


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        ("ctypes", "import ctypes\ndef grade(s, i):\n    return 1.0\n", "import ctypes"),
        ("gc escape", "import gc\ndef grade(s, i):\n    gc.get_objects()\n", "gc.get_objects"),
        (
            "patch the hook",
            "import sys\ndef grade(s, i):\n    sys.settrace(lambda *a: None)\n",
            "sys.settrace",
        ),
        (
            "read a file",
            "def grade(s, i):\n    return len(open('/etc/hostname').read())\n",
            "reading /etc/hostname",
        ),
    ],
)
def test_an_operator_may_opt_out_and_only_the_weaker_layers_remain(
    no_sandbox: None, monkeypatch: pytest.MonkeyPatch, name: str, source: str, expected: str
) -> None:
    monkeypatch.setenv(sandbox.UNCONFINED_ENV, "1")
    [ok] = run_python_batch("def grade(s, i):\n    return 0.5\n", [({}, {})], LIMITS)
    assert ok.score == 0.5
    score, error = grade_one(source)
    assert score is None and expected in error, (name, error)
    assert sandbox_info()["confined"] is False


@confined
def test_a_grader_writing_lines_to_the_result_channel_is_cut_off() -> None:
    """Every line on the result channel is parsed in the service's process: a grader that found the channel
    and wrote `{}` lines to it for 20 s had cost the API process 19 s of CPU. Past one line a result (and
    the ready line), and a thousand stray ones, the channel is not the runner's: the run is stopped."""
    source = (
        "import os, time\n"
        "def grade(sample, item):\n"
        "    mine = os.fstat(2).st_ino\n"
        "    fds = [fd for fd in range(3, 20) if _other(fd, mine)]\n"
        "    end = time.time() + 30\n"
        "    while time.time() < end:\n"
        "        for fd in fds:\n"
        "            try:\n"
        "                os.write(fd, b'{}\\n' * 20000)\n"
        "            except OSError:\n"
        "                pass\n"
        "    return 1.0\n"
        "def _other(fd, mine):\n"
        "    try:\n"
        "        return os.fstat(fd).st_ino != mine\n"
        "    except OSError:\n"
        "        return False\n"
    )
    score, error = grade_one(source, SandboxLimits(timeout=60))
    # cut off (run to its end, it would have scored 1.0 after 30 s)
    assert score is None and "more lines than there are results" in error, error
