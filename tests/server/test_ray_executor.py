"""`--executor ray` (-m system): a real Ray cluster on this machine (a head and two worker nodes of
one CPU each, separate processes: raycluster.py) and the service in process with the fake CLI, so the jobs
take seconds. Three jobs run two at a time and succeed, one Ray job each; a cancel stops the Ray job.
tests/server/test_cluster.py has the rest with the real CLI: pause and resume, a node killed,
the API killed, inference replicas."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import TERMINAL, Api, fake_settings
from tests.server.raycluster import SKIP, cluster_fixture, most_running
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.store import Store

# a cluster of three processes and ~1.5 minutes: with the other multi-process tests
pytestmark = [pytest.mark.system, SKIP]

STEPS = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 6, "batch_size": 5}}}  # 12


# the fake CLI's steps take 0.3 s on the cluster's nodes (their environment is the jobs')
cluster = cluster_fixture({"FAKE_STEP_SECONDS": "0.3"})


def test_jobs_run_on_the_cluster_two_at_a_time(cluster: Any, tmp_path: Path) -> None:
    settings = fake_settings(
        tmp_path / "service", executor="ray", ray_address=cluster.address, max_running_jobs=0
    )
    key = create_key(Store(settings.database_url), "acme")[1]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        api = Api(client, key)
        jobs = [api.create_job(method=STEPS)["id"] for _ in range(3)]
        statuses, most = most_running(
            lambda: [api.get(f"/fine_tuning/jobs/{j}").json()["status"] for j in jobs], 180
        )
        assert statuses == ["succeeded"] * 3
        assert most == 2  # two nodes with one CPU each, a job asks for one
        for job_id in jobs:
            assert cluster.jobs(job_id) == {f"{job_id}-1": "SUCCEEDED"}
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
        while cluster.jobs(cancelled) != {f"{cancelled}-1": "STOPPED"}:
            assert time.monotonic() < deadline, cluster.jobs(cancelled)
            time.sleep(0.2)
        assert not (settings.jobs_dir / cancelled / "run" / "summary.json").exists()


def test_pause_resume_and_a_node_killed_mid_job(cluster: Any, tmp_path: Path) -> None:
    """Pause stops the Ray job (the fake recipe checkpoints on SIGTERM) and resume submits the next attempt
    with --resume; then the node running it is killed outright, and the job is resubmitted and resumes
    from its checkpoint on the other node."""
    import psutil

    settings = fake_settings(
        tmp_path / "service", executor="ray", ray_address=cluster.address, max_running_jobs=0
    )
    key = create_key(Store(settings.database_url), "acme")[1]
    long = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 40, "batch_size": 5}}}  # 80
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        api = Api(client, key)
        job_id = api.create_job(method=long)["id"]

        def steps() -> list[int]:
            return [e["data"]["step"] for e in reversed(api.events(job_id)) if e["type"] == "metrics"]

        api.wait(job_id, lambda j: j["status"] == "running" and len(steps()) >= 3, timeout=60)
        assert api.post(f"/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
        said = lambda: [e["message"] for e in reversed(api.events(job_id))]  # noqa: E731
        api.wait(
            job_id,
            lambda _: any(m.startswith("Job paused; it will resume from step") for m in said()),
            timeout=60,
        )
        paused_at = int(next(m for m in said() if m.startswith("Job paused")).rsplit(" ", 1)[-1])
        assert cluster.jobs(job_id) == {f"{job_id}-1": "STOPPED"}
        assert api.post(f"/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
        api.wait(job_id, lambda _: f"Fine-tuning job resumed from step {paused_at}" in said(), timeout=60)
        api.wait(
            job_id,
            lambda _: any(
                m.startswith("Checkpoint created at step") and int(m.split()[4]) > paused_at for m in said()
            ),
            timeout=60,
        )
        [pid] = [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if job_id in " ".join(p.info["cmdline"] or [])
            and "fake_tunery.py" in " ".join(p.info["cmdline"] or [])
            and "/bin/sh" not in (p.info["cmdline"] or [""])[0]
        ]
        node = cluster.worker_of(pid)
        assert node is not None
        cluster.kill_worker(node)
        try:
            done = api.wait_status(job_id, *TERMINAL, timeout=180)
            assert done["status"] == "succeeded", done
            lost = [m for m in said() if "was lost on the Ray cluster" in m]
            assert len(lost) == 1 and "(retry 1 of 2)" in lost[0], said()
            runs = cluster.jobs(job_id)
            assert runs == {f"{job_id}-1": "STOPPED", f"{job_id}-2": "FAILED", f"{job_id}-3": "SUCCEEDED"}
            assert steps()[-1] == 80 and sorted(set(steps())) == list(range(1, 81))
        finally:
            cluster.add_worker()
            cluster.wait_for_nodes(3)
