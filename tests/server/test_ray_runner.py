"""A Ray job's output reaches train.log even when the cluster is slow to give it at the job's end: the
runner reports the end only once it has read the output, or after FINAL_OUTPUT_SECONDS."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tunery.server.jobs import executors
from tunery.server.jobs.executors import RayRunner


class Cluster:
    """Ray's job client, as far as the runner asks it: one job, ended, whose log answers after `fails`."""

    def __init__(self, fails: int) -> None:
        self.fails = fails
        self.asked = 0

    def get_job_info(self, submission_id: str) -> Any:
        return SimpleNamespace(status="SUCCEEDED", message="", driver_exit_code=0, error_type=None)

    def get_job_logs(self, submission_id: str) -> str:
        self.asked += 1
        if self.asked <= self.fails:
            raise TimeoutError("Read timed out.")
        return "Running entrypoint for job j-1\ndone: 12 steps\n"


def runner(cluster: Cluster, log: Path) -> RayRunner:
    log.write_text("$ tunery train sft\n")
    return RayRunner(SimpleNamespace(client=cluster), "j-1", log)  # type: ignore[arg-type]


def test_the_end_waits_for_the_output(tmp_path: Path) -> None:
    cluster = Cluster(fails=2)
    job = runner(cluster, tmp_path / "train.log")
    assert job.poll() is None and job.poll() is None  # ended, but its output not read yet
    assert job.poll() == 0
    assert (
        tmp_path / "train.log"
    ).read_text() == "$ tunery train sft\nRunning entrypoint for job j-1\ndone: 12 steps\n"
    assert job.poll() == 0 and cluster.asked == 3  # read once, not again


def test_a_cluster_that_never_gives_the_output_does_not_hold_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executors, "FINAL_OUTPUT_SECONDS", 0.0)
    job = runner(Cluster(fails=10**6), tmp_path / "train.log")
    assert job.poll() == 0
    assert (tmp_path / "train.log").read_text() == "$ tunery train sft\n"
