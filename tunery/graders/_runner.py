"""The child side of the Python grader sandbox: standard library only, run as `python -I -S -c <this file>`
inside bubblewrap (or `python -I -c` when the operator runs graders unconfined; see `sandbox.py`).

It reads one JSON request from stdin: {"source", "confine", "scratch", "site", "pairs": [[sample, item],
...], "limits"}. Before the user's code runs it (1) moves the result channel off fd 1, so `print` goes to
stderr, (2) sets resource limits, (3) confined: enters a user and mount namespace of its own to remount
the scratch directory noexec and hide /proc, then drops every capability (unconfined: unshares the
network where allowed), (4) installs a seccomp filter on x86-64 Linux that refuses new processes and threads, exec,
sockets, ptrace, mounts, namespaces, memfd, io_uring, keyrings, module loading, raising the limits and
signals to other processes, and (5) installs an audit hook that refuses the same at the Python level plus
file access outside the scratch directory (reads are also allowed from Python's own library directories).
If confining fails it exits with status 3 before any user code runs. It then writes one JSON line per
sample to the result channel: {"i": index, "score": x} or {"i": index, "error": "..."}. The first line,
{"ready": ..., "confined": bool, "seccomp": bool, ...}, reports the set-up.

The audit hook keeps every value it needs in positional default arguments (an immutable tuple of
tuples, frozensets, strings and C functions bound before user code runs) and refers to no global name,
so user code cannot change its behaviour by patching modules or builtins; nothing outside the
interpreter refers to the hook, and the ways to reach it (gc, tracing) are refused, as is replacing a
function's `__code__`. ctypes, used by the set-up, is dropped from sys.modules before user code runs,
so importing it again is an audited import that the hook refuses. The hook is a second layer with
readable messages; the boundary is the kernel's (namespaces, seccomp, limits).
"""

import json
import os
import sys


def _seccomp_filter():
    """Refuse fork/exec/sockets/ptrace/signals-to-others in the kernel (x86-64 only). True if installed."""
    import ctypes
    import struct

    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return False
    allow, kill_process = 0x7FFF0000, 0x80000000

    def errno(code):
        return 0x00050000 | code

    eperm, eacces, enosys = 1, 13, 38
    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    program = []

    def add(code, k, jt=0, jf=0):
        program.append(struct.pack("HBBI", code, jt, jf, k))

    add(ld_w_abs, 4)  # seccomp_data.arch
    add(jeq_k, 0xC000003E, 1, 0)  # AUDIT_ARCH_X86_64
    add(ret_k, kill_process)
    add(ld_w_abs, 0)  # seccomp_data.nr
    add(0x35, 0x40000000, 0, 1)  # jge: the x32 ABI
    add(ret_k, errno(eperm))
    refused = {
        57: eperm, 58: eperm, 59: eperm, 322: eperm,  # fork vfork execve execveat
        # clone, threads included: a thread is a task of the kernel's too, and the grader's user (root's
        # when the service runs as root) is not held by RLIMIT_NPROC, so threads could use up the
        # machine's process ids; a grader computes a score on one thread
        56: eperm,
        41: eacces, 53: eacces,  # socket socketpair: no sockets at all, Unix ones included
        101: eperm, 310: eperm, 311: eperm,  # ptrace process_vm_readv/writev
        200: eperm, 129: eperm, 297: eperm, 424: eperm, 438: eperm,  # tkill sigqueue pidfd signal/getfd
        272: eperm, 308: eperm, 165: eperm, 166: eperm, 155: eperm, 161: eperm,  # namespaces, mounts, chroot
        428: eperm, 429: eperm, 430: eperm, 431: eperm, 432: eperm, 433: eperm, 442: eperm,  # new mount API
        321: eperm, 298: eperm, 323: eperm, 248: eperm, 249: eperm, 250: eperm,  # bpf perf userfaultfd keys
        425: eperm, 426: eperm, 427: eperm,  # io_uring
        319: eperm, 447: eperm,  # memfd_create memfd_secret: no anonymous files to map as code
        175: eperm, 313: eperm, 176: eperm, 246: eperm, 320: eperm,  # kernel modules, kexec
        303: eperm, 304: eperm, 312: eperm, 126: eperm, 134: eperm,  # file handles, kcmp, capset, uselib
        172: eperm, 173: eperm, 103: eperm, 169: eperm, 167: eperm, 168: eperm,  # iopl ioperm syslog reboot swap
        160: eperm, 302: eperm,  # setrlimit prlimit64: the limits stay as set
        112: eperm, 109: eperm,  # setsid setpgid: stay in the process group that the timeout kills
        435: enosys,  # clone3: glibc falls back to clone, refused above
        # System V shared memory, semaphores and message queues: a segment outlives its detaching and is not
        # counted in RLIMIT_AS, so it would hold the host's memory past the grader's limit until it exits
        29: eperm, 30: eperm, 31: eperm, 67: eperm,  # shmget shmat shmctl shmdt
        64: eperm, 65: eperm, 66: eperm, 220: eperm,  # semget semop semctl semtimedop
        68: eperm, 69: eperm, 70: eperm, 71: eperm,  # msgget msgsnd msgrcv msgctl
    }  # fmt: skip
    for nr, code in refused.items():
        add(jeq_k, nr, 0, 1)
        add(ret_k, errno(code))
    pid = os.getpid()
    # (syscall, flag or value its first argument must have, jump kind, errno when it does not)
    argument_checks = [
        (62, pid, jeq_k, eperm),  # kill: only this process
        (234, pid, jeq_k, eperm),  # tgkill: only this process's threads
    ]
    for nr, wanted, jump, code in argument_checks:
        add(jeq_k, nr, 0, 4)
        add(ld_w_abs, 16)  # args[0], low 32 bits
        add(jump, wanted, 0, 1)
        add(ret_k, allow)
        add(ret_k, errno(code))
    add(ret_k, allow)
    buffer = ctypes.create_string_buffer(b"".join(program))
    fprog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    fprog_buffer = ctypes.create_string_buffer(fprog)
    if libc.prctl(38, 1, None, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    return libc.prctl(22, 2, ctypes.addressof(fprog_buffer), 0, 0) == 0  # PR_SET_SECCOMP, FILTER


def _machine():
    return os.uname().machine


def _disarm_subprocess():
    """Unconfined: the audit hook refuses importing _posixsubprocess, so it is imported here and its
    fork_exec disarmed; libraries that import subprocess still load, and none can start a process.
    (Confined, the seccomp filter refuses fork and exec, and the import is allowed.)"""
    import _posixsubprocess
    import subprocess

    def refused(*args, **kwargs):
        raise PermissionError("blocked in the grader sandbox: starting a process")

    _posixsubprocess.fork_exec = refused
    subprocess._fork_exec = refused


def _limit(limits):
    """Lower this process's resource limits (soft and hard) before any user code runs."""
    import resource

    for name, value in (
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_CPU", limits["cpu_seconds"]),
        ("RLIMIT_FSIZE", limits["file_bytes"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))


def _unshare_network():
    """Unconfined mode: a new, empty network namespace (inside a new user namespace when that is allowed).

    Returns what was unshared, or "" when the kernel refused both.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newuser, clone_newnet = 0x10000000, 0x40000000
    if libc.unshare(clone_newuser | clone_newnet) == 0:
        return "user+net"
    if libc.unshare(clone_newnet) == 0:
        return "net"
    return ""


def _confine(scratch):
    """Inside bubblewrap: remount the scratch directory noexec, hide /proc, then hold no capabilities.

    bubblewrap mounts its tmpfs without noexec and cannot be asked for it, so the runner takes a user and
    mount namespace of its own (where it may change mounts it sees) for two mount calls, then drops every
    capability; the seccomp filter that follows refuses mount and unshare for good. Raises OSError.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]

    def check(result, what):
        if result != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{what}: {os.strerror(code)}")

    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(0x10000000 | 0x00020000), "unshare(CLONE_NEWUSER | CLONE_NEWNS)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)
    ms_rdonly, ms_nosuid, ms_nodev, ms_noexec, ms_remount, ms_bind = 1, 2, 4, 8, 32, 4096
    flags = ms_remount | ms_bind | ms_nosuid | ms_nodev | ms_noexec
    check(libc.mount(None, scratch.encode(), None, flags, None), f"remount {scratch} noexec")
    hide = ms_rdonly | ms_nosuid | ms_nodev | ms_noexec
    check(libc.mount(b"none", b"/proc", b"tmpfs", hide, b"size=4k,mode=555"), "hide /proc")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset (drop every capability)")


def _install_guard(scratch, read_roots, confined):
    import posix
    import stat

    deny_events = frozenset(
        [
            "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
            "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile",
            "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
            "resource.setrlimit", "resource.prlimit", "os.symlink", "os.link", "webbrowser.open",
            "urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect", "poplib.connect",
            "imaplib.open", "nntplib.connect", "telnetlib.Telnet.open",
        ]
    )  # fmt: skip
    deny_prefixes = ("ctypes.", "socket.", "ssl.")
    deny_imports = frozenset(
        ["ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend", "_xxsubinterpreters"]
    )
    guard_itself = not confined
    if confined:
        # The kernel is the boundary: native code meets the same walls, so ctypes (scipy needs it) is
        # allowed, and what only protected this hook (gc walks, tracing, __code__, which libraries use) is
        # not refused. Processes, sockets and files outside the scratch still get a readable refusal here.
        deny_events -= {
            "gc.get_objects",
            "gc.get_referrers",
            "gc.get_referents",
            "sys.settrace",
            "sys.setprofile",
        }
        deny_prefixes = ("socket.", "ssl.")
        deny_imports = frozenset(["_xxsubinterpreters"])
    # event -> (positions of paths that must lie in the scratch directory, positions of dir_fd arguments)
    path_events = (
        ("os.remove", (0,), (1,)), ("os.rmdir", (0,), (1,)), ("os.rename", (0, 1), (2, 3)),
        ("os.mkdir", (0,), (2,)), ("os.chmod", (0,), (2,)), ("os.chown", (0,), (3,)),
        ("os.utime", (0,), (3,)), ("os.truncate", (0,), ()), ("os.chflags", (0,), ()),
        ("os.lchflags", (0,), ()), ("os.setxattr", (0,), ()), ("os.removexattr", (0,), ()),
        ("os.mkfifo", (0,), (2,)), ("os.mknod", (0,), (3,)), ("tempfile.mkstemp", (0,), ()),
        ("tempfile.mkdtemp", (0,), ()),
    )  # fmt: skip
    list_events = frozenset(["os.listdir", "os.scandir", "glob.glob", "glob.glob/2", "os.listxattr"])
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    devices = ("/dev/null", "/dev/urandom", "/dev/random", "/dev/zero")

    def guard(
        event,
        args,
        _deny=deny_events,
        _deny_prefixes=deny_prefixes,
        _deny_imports=deny_imports,
        _guard_itself=guard_itself,
        _path_events=path_events,
        _list_events=list_events,
        _write_flags=write_flags,
        _scratch=(scratch,),
        _roots=tuple(read_roots),
        _devices=devices,
        _getcwd=posix.getcwd,
        _lstat=posix.lstat,
        _readlink=posix.readlink,
        _s_islnk=stat.S_ISLNK,
        _isinstance=isinstance,
        _str=str,
        _bytes=bytes,
        _int=int,
        _str_copy=str.__str__,
        _decode=bytes.decode,
        _oserror=OSError,
        _permission=PermissionError,
        _import_error=ImportError,
    ):
        # Values from user code may be str/bytes subclasses that lie in __eq__, startswith and the rest:
        # exact() copies them into plain str first, with methods of the base types only.
        def exact(value):
            if _isinstance(value, _bytes):
                return _decode(value, "utf-8", "surrogateescape")
            if _isinstance(value, _str):
                return _str_copy(value)
            return None

        def resolve(path):
            """Absolute, normalised, symlinks followed; None for anything but a str or bytes path."""
            path = exact(path)
            if path is None or "\0" in path:
                return None
            if not path.startswith("/"):
                path = _getcwd() + "/" + path
            pending = path.split("/")[::-1]
            done = []
            hops = 0
            while pending:
                part = pending.pop()
                if part in ("", "."):
                    continue
                if part == "..":
                    if done:
                        done.pop()
                    continue
                candidate = "/" + "/".join([*done, part])
                try:
                    is_link = _s_islnk(_lstat(candidate).st_mode)
                except _oserror:
                    is_link = False
                if is_link and hops < 40:
                    hops += 1
                    target = _readlink(candidate)
                    if target.startswith("/"):
                        done = []
                    pending.extend(target.split("/")[::-1])
                else:
                    done.append(part)
            return "/" + "/".join(done)

        def inside(path, roots):
            for root in roots:  # noqa: SIM110  (any() would be a global lookup that user code can patch)
                if path == root or path.startswith(root + "/"):
                    return True
            return False

        def refuse(what):
            raise _permission(f"blocked in the grader sandbox: {what}")

        if event == "open":
            path, mode, flags = args
            if _isinstance(path, _int):
                return  # an already open descriptor
            text = exact(path)
            if mode is None and text is not None and not text.startswith("/"):
                refuse(f"os.open of a relative path {text!r} (it could be relative to any directory fd)")
            resolved = resolve(path)
            if resolved is None:
                refuse("opening a path given as neither str nor bytes")
            writing = _isinstance(flags, _int) and flags & _write_flags
            if inside(resolved, _scratch):
                return
            if not writing and (inside(resolved, _roots) or resolved in _devices):
                return
            if writing:
                refuse(f"writing {resolved} (only the scratch directory is writable)")
            refuse(f"reading {resolved} (only the scratch directory and Python's libraries are readable)")
        if event in _list_events:
            resolved = resolve(args[0] if args else ".")
            if resolved is None or not (inside(resolved, _scratch) or inside(resolved, _roots)):
                refuse(f"listing {resolved or 'a directory given as neither str nor bytes'}")
            return
        for name, paths, dir_fds in _path_events:
            if event == name:
                for position in dir_fds:
                    if args[position] is not None and not (
                        _isinstance(args[position], _int) and args[position] == -1
                    ):
                        refuse(f"{event} relative to a directory descriptor")
                for position in paths:
                    resolved = resolve(args[position])
                    if resolved is None or not inside(resolved, _scratch):
                        refuse(
                            f"{event} on {resolved or 'a non-path'} (only the scratch directory is writable)"
                        )
                return
        if event == "import":
            if exact(args[0]) in _deny_imports:
                raise _import_error(f"blocked in the grader sandbox: import {exact(args[0])}")
            return
        if event == "object.__setattr__":
            if _guard_itself and exact(args[1]) == "__code__":
                refuse("replacing a function's __code__")
            return
        if event == "sqlite3.connect":
            database = exact(args[0])
            if database not in (":memory:", ""):
                resolved = resolve(database)
                if resolved is None or not inside(resolved, _scratch):
                    refuse(f"sqlite3 database {database!r} outside the scratch directory")
            return
        if event in _deny or event.startswith(_deny_prefixes):
            refuse(event)

    sys.addaudithook(guard)


def _read_roots():
    import sysconfig

    roots = []
    libraries = [sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")]
    for path in [*sys.path, *libraries, "/usr/share/zoneinfo"]:
        if path and os.path.isdir(path):
            roots.append(os.path.realpath(path))
    return roots


def _score(value):
    import math
    import numbers

    if not isinstance(value, numbers.Real):
        raise TypeError(f"grade() returned {type(value).__name__} {str(value)[:80]!r}, not a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"grade() returned {value}, not a finite number")
    return value


def _error_text(exc):
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<grader>"]
    lines = [f"line {f.lineno} in {f.name}: {f.line}" for f in frames[-3:]]
    message = f"{exc.__class__.__name__}: {exc}"
    return (message + ("\n" + "\n".join(lines) if lines else ""))[:2000]


def main():
    sys.dont_write_bytecode = True
    request = json.loads(sys.stdin.buffer.read())
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    results = os.dup(1)
    os.dup2(2, 1)  # the user's print() goes to stderr; results have their own channel

    def send(record):
        data = (json.dumps(record) + "\n").encode()
        while data:
            data = data[os.write(results, data) :]

    scratch = os.path.realpath(request["scratch"])
    os.chdir(scratch)
    _limit(request["limits"])
    confined, namespaces = False, ""
    if request["confine"]:
        try:
            _confine(scratch)
        except OSError as exc:  # never run user code half-confined
            os.write(2, f"confining the grader failed: {exc}\n".encode())
            os._exit(3)
        confined, namespaces = True, "user+mount+pid+net+ipc+uts+cgroup"
    elif request["network_namespace"] and sys.platform == "linux":
        try:
            namespaces = _unshare_network()
        except (OSError, AttributeError):
            namespaces = ""
    try:
        seccomp = _seccomp_filter()
    except (OSError, AttributeError, ValueError):
        seccomp = False
    if request["confine"] and not seccomp and sys.platform == "linux" and _machine() == "x86_64":
        os.write(2, b"confining the grader failed: the seccomp filter could not be installed\n")
        os._exit(3)
    if request.get("site"):
        sys.path.append(request["site"])  # the packages a grader may import (python -S: no site-packages)
    if not confined:
        for name in [n for n in sys.modules if n in ("ctypes", "_ctypes") or n.startswith("ctypes.")]:
            del sys.modules[name]
        _disarm_subprocess()
    import linecache
    import math  # noqa: F401  (imported before the hook: formatting an error must not need new imports)
    import numbers  # noqa: F401
    import traceback  # noqa: F401

    linecache.cache["<grader>"] = (
        len(request["source"]),
        None,
        request["source"].splitlines(True),
        "<grader>",
    )

    _install_guard(scratch, _read_roots(), confined)
    send({"ready": True, "confined": confined, "seccomp": seccomp, "namespaces": namespaces})
    pairs = request["pairs"]
    namespace = {"__name__": "grader", "__builtins__": __builtins__}
    try:
        exec(compile(request["source"], "<grader>", "exec"), namespace)
        grade = namespace.get("grade")
        if not callable(grade):
            raise NameError("the code defines no function grade(sample, item)")
    except BaseException as exc:  # the code fails to import: every sample gets the same error
        text = _error_text(exc)
        for i in range(request["start"], len(pairs)):
            send({"i": i, "error": f"loading the grader failed: {text}"})
        return
    for i in range(request["start"], len(pairs)):
        sample, item = pairs[i]
        try:
            send({"i": i, "score": _score(grade(sample, item))})
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: one sample, one error
            send({"i": i, "error": _error_text(exc)})


if __name__ == "__main__":
    main()
