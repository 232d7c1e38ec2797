"""`tunery federated server | client`: a federation whose sites are machines of their own (Flower's
deployment runtime).

    tunery federated server --valid valid.jsonl --num-clients 2 --rounds 3 --out runs/fed     # the server
    tunery federated client --server 10.0.0.5:9092 --data site_a.jsonl --out site_a            # at each site

The server starts a Flower SuperLink and submits Tunery's federated run to it (federated/app.py): the
same round loop and run directory as `tunery train federated`, waiting for `num_clients` sites. Each site
starts a Flower SuperNode that connects to it, with its data path in its own node config only: the path
and the data never reach the server, which sees adapters, example counts and losses.

Flower's connections here are unencrypted (`--insecure`): the server listens on 127.0.0.1 unless told
otherwise. Across a network, put it behind TLS (Flower's own certificate flags) or a VPN: whoever can
reach the port can submit code that the sites run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tunery.errors import TuneryError

FLOWER_VERSION_NOTE = "make install"
READY_TIMEOUT_S = 60.0


def _flower_env(home: Path) -> dict[str, str]:
    """Flower's processes: state under `home`, no telemetry or update check, its commands on PATH."""
    from tunery.federated import OFFLINE_ENV

    return {
        **OFFLINE_ENV,
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _flower_command(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        raise TuneryError(
            f"{name} is not installed: federated training runs on Flower ({FLOWER_VERSION_NOTE})"
        )
    return path


def _die_with_parent() -> None:
    """In a Flower daemon before it starts: SIGTERM when this command's process dies, even by SIGKILL."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _terminate_on_sigterm() -> None:
    """SIGTERM ends this command through its `finally` blocks, which stop the Flower daemons it started."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _adopt_orphans() -> None:
    """Become the child subreaper: Flower's daemons start their apps in sessions of their own, and an app
    whose daemon ended would otherwise live on under init, still holding a model in memory."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def _descendants() -> list[int]:
    """This process's descendants (with `_adopt_orphans`, also those whose parents have ended)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop_descendants(grace_s: float = 10.0) -> None:
    """SIGTERM to every process this command started, directly or not; SIGKILL to those still there."""
    pids = _descendants()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            for pid in list(pids):
                try:
                    if os.waitpid(pid, os.WNOHANG) != (0, 0):
                        pids.remove(pid)
                except ChildProcessError:  # not our child: gone once /proc no longer lists it
                    if not Path(f"/proc/{pid}").exists():
                        pids.remove(pid)
            time.sleep(0.1)
        if not pids:
            return


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TuneryError(f"the Flower SuperLink exited ({proc.returncode}): {_tail(log)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TuneryError(f"the Flower SuperLink did not listen on {host}:{port} within {READY_TIMEOUT_S:.0f} s")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the server -------------------------------------------------------------------------------------------


def cmd_server(args: argparse.Namespace) -> int:
    from tunery.commands.train import check_before_loading, config_overrides, print_summary
    from tunery.recipes.configs import FederatedConfig
    from tunery.run.config import build_config, to_dict
    from tunery.run.files import read_summary

    args.method = "federated"
    overrides = config_overrides(args) | {"federation": "deployment"}
    if args.resume:
        from tunery.training.rundir import resumed_config

        cfg = resumed_config(FederatedConfig, args.resume)
    else:
        check_before_loading(args, overrides)
        cfg = build_config(FederatedConfig, args.config, overrides)
    out = Path(cfg.out).resolve()
    _terminate_on_sigterm()
    _adopt_orphans()
    work = Path(tempfile.mkdtemp(prefix="tunery-federation-"))
    try:
        config_path = work / "federation.yaml"
        config_path.write_text(yaml.safe_dump({**to_dict(cfg), "out": str(out)}, sort_keys=False))
        app = work / "app"
        app.mkdir()
        component = "secure_app" if cfg.secure_aggregation else "app"
        (app / "pyproject.toml").write_text(_APP_PYPROJECT.replace("client:app", f"client:{component}"))
        home = work / "flower"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "tunery"\n\n[superlink.tunery]\naddress = "127.0.0.1:{args.port}"\n'
            "insecure = true\n"
        )
        env = _flower_env(home)
        log = work / "superlink.log"
        with log.open("wb") as sink:
            superlink = subprocess.Popen(
                # the SuperLink's state in memory: with a database file, SQLite's lock is held while a site's
                # adapter is written, and a busy machine's other writers time out ("database is locked")
                [_flower_command("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                 "--host", args.host, "--port", str(args.port)],
                env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        try:
            _wait_for_port(
                "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host, args.port, superlink, log
            )
            print(
                f"federation server on {args.host}:{args.port}: waiting for {cfg.num_clients} sites "
                f"(tunery federated client --server HOST:{args.port} --data FILE --out DIR)",
                flush=True,
            )
            run_config = (
                f"tunery-config='{config_path}' resume={'true' if args.resume else 'false'} "
                f"overwrite={'true' if args.overwrite else 'false'}"
            )
            status = _run_to_the_end(app, run_config, env, superlink)
        finally:
            _stop(superlink)
            _stop_descendants()
        summary = read_summary(out)
        if summary is None or summary.steps < cfg.rounds and not (out / "final").is_dir():
            raise TuneryError(
                f"the federated run did not finish (Flower: {status}); its log is above, the SuperLink's ends "
                f"with:\n{_tail(log)}\ncontinue with: tunery federated server --resume {out}"
            )
        print_summary(summary.to_json())
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_to_the_end(
    app: Path, run_config: str, env: dict[str, str], superlink: subprocess.Popen[bytes]
) -> str:
    """Start the Flower run, show its log, and wait until it has finished: its final status. The log stream
    can end before the run does (the SuperLink answering a request with an error ends it): then the run's
    status is polled."""
    flwr = _flower_command("flwr")
    started = subprocess.run(
        [flwr, "run", str(app), "tunery", "--run-config", run_config, "--format", "json"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    try:
        run_id = str(json.loads(started.stdout[started.stdout.index("{") :])["run-id"])
    except (ValueError, KeyError, TypeError):
        raise TuneryError(
            f"Flower did not start the run:\n{started.stdout[-2000:]}{started.stderr[-2000:]}"
        ) from None
    print(f"Flower run {run_id}", flush=True)
    subprocess.run([flwr, "log", run_id, "tunery", "--stream"], env=env, check=False)
    waiting = False
    while superlink.poll() is None:
        status = _run_status(flwr, run_id, env)
        if status.startswith("finished"):
            return status
        if not waiting:
            print(f"(the log stream ended; waiting for Flower run {run_id}, now {status})", flush=True)
            waiting = True
        time.sleep(5)
    return "the SuperLink stopped"


def _run_status(flwr: str, run_id: str, env: dict[str, str]) -> str:
    listed = subprocess.run(
        [flwr, "ls", "tunery", "--run-id", run_id, "--format", "json"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    try:
        runs = json.loads(listed.stdout[listed.stdout.index("{") :])["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError, TypeError):
        return "unknown"


_APP_PYPROJECT = """\
# A Flower app whose components are Tunery's installed modules (written by `tunery federated server`).
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "tunery-federation"
version = "1.0.0"
description = "Tunery federated SFT"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "tunery"

[tool.flwr.app.components]
serverapp = "tunery.federated.app:server_app"
clientapp = "tunery.federated.client:app"

[tool.flwr.app.config]
tunery-config = ""
resume = false
overwrite = false
"""


def server_flags(p: argparse.ArgumentParser) -> None:
    from tunery.commands.train import add_flags

    add_flags(p, "federated")
    where = p.add_argument_group("where the server listens")
    where.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; see above)"
    )
    where.add_argument("--port", type=int, default=9092, help="the sites connect here (default 9092)")


# --- a site -----------------------------------------------------------------------------------------------


def cmd_client(args: argparse.Namespace) -> int:
    from tunery.data.formats import foreign_problem
    from tunery.data.jsonl import check_readable

    data = Path(args.data).resolve()
    check_readable(data)
    foreign = foreign_problem(str(data), "chat")
    if foreign is not None:
        raise TuneryError(f"{data}, line {foreign.line}: {foreign.message}")
    out = Path(args.out).resolve()
    name = args.name or data.stem
    for value in (str(data), str(out), name):
        if "'" in value or '"' in value:
            raise TuneryError(f"{value}: quotes cannot go in a site's name or paths (Flower's node config)")
    out.mkdir(parents=True, exist_ok=True)
    home = out / "flower"
    home.mkdir(exist_ok=True)
    node_config = f"data-path='{data}' site-dir='{out}' site-name='{name}'"
    command = [
        _flower_command("flower-supernode"), "--insecure", "--superlink", args.server, "--port", str(args.port),
        "--node-config", node_config,
    ]  # fmt: skip
    print(
        f"site {name}: training data {data} stays here; joining the federation at {args.server}", flush=True
    )
    _terminate_on_sigterm()
    _adopt_orphans()
    node = subprocess.Popen(
        command, env=_flower_env(home), start_new_session=True, preexec_fn=_die_with_parent
    )
    try:
        return node.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        _stop(node)
        _stop_descendants()


def client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the federation server's address")
    p.add_argument("--data", required=True, help="this site's training JSONL (it never leaves this machine)")
    p.add_argument("--out", required=True, help="this site's directory: its screening and local runs")
    p.add_argument("--name", help="the site's name in the server's metrics (default: the data file's name)")
    p.add_argument("--port", type=int, default=9094, help="this site's local Flower API port (default 9094)")
