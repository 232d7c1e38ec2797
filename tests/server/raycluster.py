"""A throwaway Ray cluster on this machine for the service's cluster tests: a head node with no CPUs of
its own (jobs never run on it) and worker nodes of one CPU each, every node a `ray start --block` process
of its own, on ports of its own, under a temporary directory. A worker node can be killed outright, its
whole process tree at once (the job it runs with it), as a machine that dies takes it.

    cluster = RayCluster.start(tmp, workers=2)
    cluster.address            # the job API, http://127.0.0.1:PORT (`tunery serve --ray-address`)
    cluster.kill_worker(0)
    cluster.jobs("ftjob-...")   # the cluster's Ray jobs whose names start so: name -> status
    cluster.stop()

`cluster_fixture(env)` makes a module's pytest fixture of one (skipped without ray[default]).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RayCluster:
    def __init__(self, temp: Path, log_dir: Path) -> None:
        self.temp, self.log_dir = temp, log_dir
        self.head: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.gcs = ""
        self.address = ""

    @classmethod
    def start(cls, log_dir: Path, workers: int = 2, env: dict[str, str] | None = None) -> RayCluster:
        # Ray's sockets live under its temp dir: a short path keeps them under the 107-byte limit
        cluster = cls(Path(tempfile.mkdtemp(prefix="tray", dir="/tmp")), log_dir)
        cluster.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        gcs, dashboard, client, agent, grpc, metrics, runtime = free_ports(7)
        cluster.gcs = f"127.0.0.1:{gcs}"
        cluster.address = f"http://127.0.0.1:{dashboard}"
        cluster.head = cluster._node(
            "head",
            ["--head", "--port", str(gcs), "--dashboard-port", str(dashboard), "--include-dashboard", "true"]
            + ["--dashboard-host", "127.0.0.1", "--ray-client-server-port", str(client), "--num-cpus", "0"]
            + ["--temp-dir", str(cluster.temp)]
            + cluster._agent_ports(agent, grpc, metrics, runtime),
        )
        try:
            cluster._wait_for_head()
            for n in range(workers):  # one at a time: two nodes starting at once can time out on 2 cores
                cluster.add_worker()
                cluster.wait_for_nodes(n + 2)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _agent_ports(self, agent: int, grpc: int, metrics: int, runtime: int) -> list[str]:
        # each node's agents on ports of their own: on one machine they would otherwise share Ray's defaults
        return [
            "--dashboard-agent-listen-port",
            str(agent),
            "--dashboard-agent-grpc-port",
            str(grpc),
            "--metrics-export-port",
            str(metrics),
            "--runtime-env-agent-port",
            str(runtime),
            "--node-ip-address",
            "127.0.0.1",
            "--disable-usage-stats",
            "--block",
        ]

    def _node(self, name: str, flags: list[str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"ray-{name}.log").open("ab")
        try:
            return subprocess.Popen(
                [RAY, "start", *flags],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        finally:
            log.close()

    def add_worker(self) -> None:
        agent, grpc, metrics, runtime = free_ports(4)
        index = len(self.workers)
        self.workers.append(
            self._node(
                f"worker{index}",
                ["--address", self.gcs, "--num-cpus", "1"] + self._agent_ports(agent, grpc, metrics, runtime),
            )
        )

    def _wait_for_head(self, timeout: float = 120) -> None:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout
        while True:
            assert self.head is not None and self.head.poll() is None, (
                self.log_dir / "ray-head.log"
            ).read_text()
            try:
                JobSubmissionClient(self.address).list_jobs()
                return
            except Exception:
                assert time.monotonic() < deadline, "the Ray head did not start"
                time.sleep(0.5)

    def alive_nodes(self) -> int:
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.address}/nodes?view=summary", timeout=10) as reply:
            summary = json.load(reply)["data"]["summary"]
        return sum(1 for node in summary if node["raylet"]["state"] == "ALIVE")

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                if self.alive_nodes() >= n:
                    return
            assert time.monotonic() < deadline, f"the Ray cluster has not {n} live nodes"
            time.sleep(0.5)

    def kill_worker(self, index: int) -> None:
        """SIGKILL the worker node and everything it started (its raylet, workers, the job's command)."""
        _kill_tree(self.workers[index].pid)
        self.workers[index].wait()

    def worker_of(self, pid: int) -> int | None:
        """The index of the worker node whose process tree holds `pid`."""
        for index, node in enumerate(self.workers):
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = {p.pid for p in psutil.Process(node.pid).children(recursive=True)}
                if pid in tree:
                    return index
        return None

    def jobs(self, prefix: str) -> dict[str, str]:
        """The cluster's Ray jobs whose names start with `prefix`: submission id -> status."""
        from ray.job_submission import JobSubmissionClient

        found = JobSubmissionClient(self.address).list_jobs()
        return {
            j.submission_id: str(j.status.value) for j in found if (j.submission_id or "").startswith(prefix)
        }

    def stop(self) -> None:
        for node in [*self.workers, self.head]:
            if node is not None and node.poll() is None:
                _kill_tree(node.pid)
                node.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)


SKIP = pytest.mark.skipif(
    importlib.util.find_spec("aiohttp") is None or importlib.util.find_spec("ray") is None,
    reason="Ray's job API needs ray[default]: pip install -e '.[cluster]'",
)


def cluster_fixture(env: dict[str, str]) -> Callable[..., Any]:
    """A module-scoped fixture: a head and two worker nodes, whose environment (`env`) the jobs get."""

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
        ray = RayCluster.start(tmp_path_factory.mktemp("ray"), workers=2, env=env)
        try:
            yield ray
        finally:
            ray.stop()

    return cluster


def most_running(statuses: Callable[[], list[str]], timeout: float) -> tuple[list[str], int]:
    """Poll `statuses()` (the jobs' statuses) until every job has ended: (the last statuses, the most
    that were `running` at one look)."""
    most, deadline = 0, time.monotonic() + timeout
    while True:
        now = statuses()
        most = max(most, now.count("running"))
        if all(s in ("succeeded", "failed", "cancelled") for s in now):
            return now, most
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
