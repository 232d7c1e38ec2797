"""`tunery serve` on an address it cannot listen on: one line that names the address, says why and which
flag to use, exit status 2 (the CLI's user errors), no traceback and no "serving" banner before it."""

from __future__ import annotations

import importlib.util
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def serve(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tunery", "serve", "--data-dir", str(tmp_path / "service"), *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_port_in_use_names_it_and_the_flag(tmp_path: Path, taken: int) -> None:
    done = serve(tmp_path, "--port", str(taken))
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and "serving" not in done.stdout.lower()
    [line] = done.stderr.splitlines()
    found = re.fullmatch(
        rf"tunery: error: http://127\.0\.0\.1:{taken} is already in use \(another `tunery serve`\?\); "
        r"start on another port with --port (\d+)",
        line,
    )
    assert found, line
    suggested = int(found[1])
    assert suggested > taken
    with socket.socket() as probe:  # the port it suggests is free
        probe.bind(("127.0.0.1", suggested))


def test_an_address_not_of_this_machine(tmp_path: Path) -> None:
    done = serve(tmp_path, "--host", "192.0.2.1", "--port", "8000")  # TEST-NET-1: never a local address
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "tunery: error: cannot listen on http://192.0.2.1:8000: Cannot assign requested address; "
        "check --host and --port"
    )
    assert "serving" not in done.stdout.lower()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ("--executor", "ray"),
            "tunery: error: --executor ray needs --ray-address: the Ray cluster's dashboard address, e.g. "
            "http://HEAD:8265 (from `ray start --head`)",
        ),
        (
            ("--ray-address", "http://127.0.0.1:1"),
            "tunery: error: --ray-address is for --executor ray; add it, or drop --ray-address",
        ),
        (
            ("--executor", "ray", "--ray-address", "127.0.0.1:1"),  # nothing listens on port 1
            "tunery: error: --ray-address http://127.0.0.1:1: cannot reach the Ray cluster's job API (Failed to "
            "connect to Ray at address: http://127.0.0.1:1.); start the head with `ray start --head "
            "--dashboard-host 0.0.0.0` and give its dashboard address, http://HEAD:8265",
        ),
        (
            ("--inference-workers", "0"),
            "tunery serve: error: argument --inference-workers: '0': give 1 or more",
        ),
        (
            ("--inference-adapters", "-1"),
            "tunery serve: error: argument --inference-adapters: '-1' is not a whole number, 0 or more",
        ),
        (
            ("--job-cpus", "0"),
            "tunery serve: error: argument --job-cpus: '0': give more than 0",
        ),
        (
            ("--train-set", "max_steps=2", "--train-set", "screen_pii=redact"),
            "tunery: error: --train-set screen_pii=redact: the service screens jobs' files with --screen-pii, "
            "which checks each training file before its job starts as well; use --screen-pii redact",
        ),
    ],
)
def test_cluster_flags_that_cannot_work(tmp_path: Path, flags: tuple[str, ...], message: str) -> None:
    """Ray without its address, an address without Ray, a cluster that does not answer: one line, before
    the banner."""
    if "127.0.0.1:1" in flags and importlib.util.find_spec("aiohttp") is None:
        pytest.skip("Ray's job API needs ray[default]: pip install -e '.[cluster]'")
    done = serve(tmp_path, "--port", "0", *flags)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and "serving" not in done.stdout.lower()
    assert done.stderr.splitlines()[-1] == message
