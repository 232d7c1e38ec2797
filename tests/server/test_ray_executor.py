"""`--executor ray` in the default run: a real Ray cluster on this machine (a head and two worker nodes of
one CPU each, separate processes: raycluster.py) and the service in process with the fake CLI, so the jobs
take seconds. Three jobs run two at a time and succeed, one Ray job each; a cancel stops the Ray job.
tests/server/test_cluster.py has the rest with the real CLI (-m system): pause and resume, a node killed,
the API killed, inference replicas."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import TERMINAL, Api, fake_settings
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.store import Store

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("aiohttp") is None or importlib.util.find_spec("ray") is None,
    reason="Ray's job API needs ray[default]: pip install -e '.[cluster]'",
)

STEPS = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 6, "batch_size": 5}}}  # 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.server.raycluster import RayCluster

    # the fake CLI's steps take 0.3 s on the cluster's nodes (their environment is the jobs')
    ray = RayCluster.start(tmp_path_factory.mktemp("ray"), workers=2, env={"FAKE_STEP_SECONDS": "0.3"})
    try:
        yield ray
    finally:
        ray.stop()


def ray_jobs(cluster: Any, job_id: str) -> dict[str, str]:
    from ray.job_submission import JobSubmissionClient

    found = JobSubmissionClient(cluster.address).list_jobs()
    return {j.submission_id: str(j.status.value) for j in found if (j.submission_id or "").startswith(job_id)}


def test_jobs_run_on_the_cluster_two_at_a_time(cluster: Any, tmp_path: Path) -> None:
    settings = fake_settings(
        tmp_path / "service", executor="ray", ray_address=cluster.address, max_running_jobs=0
    )
    key = create_key(Store(settings.database_url), "acme")[1]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        api = Api(client, key)
        jobs = [api.create_job(method=STEPS)["id"] for _ in range(3)]
        most, deadline = 0, time.monotonic() + 180
        while True:
            statuses = [api.get(f"/fine_tuning/jobs/{j}").json()["status"] for j in jobs]
            most = max(most, statuses.count("running"))
            if all(s in TERMINAL for s in statuses):
                break
            assert time.monotonic() < deadline, statuses
            time.sleep(0.1)
        assert statuses == ["succeeded"] * 3
        assert most == 2  # two nodes with one CPU each, a job asks for one
        for job_id in jobs:
            assert ray_jobs(cluster, job_id) == {f"{job_id}-1": "SUCCEEDED"}
            said = [e["message"] for e in api.events(job_id)]
            assert (
                f"Submitted to the Ray cluster as Ray job {job_id}-1, asking for 1 CPU, 2 GB memory; it starts when a node has room"
                in said
            )
            log = (settings.jobs_dir / job_id / "train.log").read_text()
            assert (
                f"Running entrypoint for job {job_id}-1" in log and "done: 12 steps" in log
            )  # Ray's output, copied

        cancelled = api.create_job(
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 5}},
            }
        )["id"]
        api.wait(
            cancelled,
            lambda j: j["status"] == "running" and any(e["type"] == "metrics" for e in api.events(cancelled)),
            timeout=60,
        )
        assert api.post(f"/fine_tuning/jobs/{cancelled}/cancel").json()["status"] == "cancelled"
        deadline = time.monotonic() + 60
        while ray_jobs(cluster, cancelled) != {f"{cancelled}-1": "STOPPED"}:
            assert time.monotonic() < deadline, ray_jobs(cluster, cancelled)
            time.sleep(0.2)
        assert not (settings.jobs_dir / cancelled / "run" / "summary.json").exists()
