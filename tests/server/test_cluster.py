"""The service on a cluster, end to end: a real Ray cluster on this machine (a head node and two worker
nodes of one CPU each, separate processes: raycluster.py), `tunery serve --executor ray` in a process of
its own, the official `openai` client, and the real CLI training tiny-random.

- three jobs run two at a time (one per worker node) and all succeed;
- cancel and pause stop the Ray job (the recipe checkpoints on SIGTERM); resume continues from there;
- a worker node killed outright mid-job: the job is resubmitted and resumes from its checkpoint;
- the API killed (SIGKILL) and restarted mid-job: it follows the same Ray job again, never a second one.

Several processes and a minute or more each: `-m system` (make test-system, CI)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from tests.server.conftest import chat_lines, jsonl
from tests.server.raycluster import SKIP, cluster_fixture, most_running
from tests.server.test_openai_client import new_key, start_server, stop_server, wait_for

pytestmark = [
    pytest.mark.system,
    SKIP,
]

# 40 examples, batch 1, 25 epochs: 1000 steps (tens of seconds), a checkpoint every 200
LONG = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 25, "batch_size": 1}}}
LONG_STEPS = 1000
MEDIUM = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 1}}}
DONE = ("succeeded", "failed", "cancelled")


cluster = cluster_fixture({"OMP_NUM_THREADS": "1"})


def ray_flags(cluster: Any) -> tuple[str, ...]:
    return ("--executor", "ray", "--ray-address", cluster.address)


@pytest.fixture(scope="module")
def served(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, Path]]:
    data_dir = tmp_path_factory.mktemp("served") / "service"
    key = new_key(data_dir, "acme")
    proc, url = start_server(data_dir, flags=ray_flags(cluster))
    try:
        yield openai.OpenAI(base_url=url, api_key=key, max_retries=0), data_dir
    finally:
        stop_server(proc)


def upload(client: openai.OpenAI, n: int = 40) -> str:
    return client.files.create(file=("train.jsonl", jsonl(chat_lines(n))), purpose="fine-tune").id


def events(client: openai.OpenAI, job_id: str) -> list[Any]:
    """All of the job's events, oldest first (the client pages through them)."""
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=500))))


def messages(client: openai.OpenAI, job_id: str) -> list[str]:
    return [e.message for e in events(client, job_id)]


def metric_steps(client: openai.OpenAI, job_id: str) -> list[int]:
    return [int(e.data["step"]) for e in events(client, job_id) if e.type == "metrics"]


def training_pid(job_id: str) -> int | None:
    """The process running the job's `tunery train` (wherever Ray put it: here, on this machine)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "train" in cmdline and any(job_id in part for part in cmdline) and "/bin/sh" not in cmdline[0]:
            return int(proc.info["pid"])
    return None


def test_three_jobs_run_two_at_a_time(served: tuple[openai.OpenAI, Path], cluster: Any) -> None:
    client, _ = served
    file_id = upload(client)
    jobs = [
        client.fine_tuning.jobs.create(model="tiny-random", training_file=file_id, method=MEDIUM)
        for _ in range(3)
    ]
    statuses, most = most_running(lambda: [client.fine_tuning.jobs.retrieve(j.id).status for j in jobs], 300)
    assert statuses == ["succeeded"] * 3
    assert most == 2  # two nodes of one CPU, a job asks for one: never three at once, and two did run
    for job in jobs:
        assert cluster.jobs(job.id) == {f"{job.id}-1": "SUCCEEDED"}
        said = messages(client, job.id)
        assert any(
            m.startswith(f"Submitted to the Ray cluster as Ray job {job.id}-1, asking for 1 CPU")
            for m in said
        )
        assert "Fine-tuning job started" in said
        assert client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model


def test_cancel_and_pause_then_resume(served: tuple[openai.OpenAI, Path], cluster: Any) -> None:
    client, data_dir = served
    file_id = upload(client)
    paused = client.fine_tuning.jobs.create(model="tiny-random", training_file=file_id, method=LONG)
    cancelled = client.fine_tuning.jobs.create(model="tiny-random", training_file=file_id, method=LONG)
    wait_for(client, paused.id, lambda j: j.status == "running" and len(metric_steps(client, j.id)) >= 3)
    client.fine_tuning.jobs.pause(paused.id)
    wait_for(client, cancelled.id, lambda j: j.status == "running" and len(metric_steps(client, j.id)) >= 3)
    client.fine_tuning.jobs.cancel(cancelled.id)
    wait_for(
        client,
        paused.id,
        lambda j: any(m.startswith("Job paused; it will resume from") for m in messages(client, j.id)),
    )
    assert client.fine_tuning.jobs.retrieve(cancelled.id).status == "cancelled"
    deadline = time.monotonic() + 60
    while set(cluster.jobs(cancelled.id).values()) != {"STOPPED"} or set(
        cluster.jobs(paused.id).values()
    ) != {"STOPPED"}:
        assert time.monotonic() < deadline, (cluster.jobs(cancelled.id), cluster.jobs(paused.id))
        time.sleep(0.5)
    assert training_pid(paused.id) is None and training_pid(cancelled.id) is None
    stopped_at = max(metric_steps(client, paused.id))
    # the recipe saved a checkpoint on SIGTERM: the resumed run goes on from there as a second Ray job
    said = messages(client, paused.id)
    checkpoint = int(next(m for m in said if m.startswith("Job paused")).rsplit(" ", 1)[-1])
    assert 0 < checkpoint <= stopped_at
    client.fine_tuning.jobs.resume(paused.id)
    done = wait_for(client, paused.id, lambda j: j.status in DONE, timeout=300)
    assert done.status == "succeeded", done.error
    assert cluster.jobs(paused.id) == {f"{paused.id}-1": "STOPPED", f"{paused.id}-2": "SUCCEEDED"}
    assert f"Fine-tuning job resumed from step {checkpoint}" in messages(client, paused.id)
    steps = metric_steps(client, paused.id)
    assert steps == sorted(set(steps)) and steps[-1] == LONG_STEPS
    assert "Fine-tuning job cancelled" in messages(client, cancelled.id)
    assert (data_dir / "jobs" / paused.id / "run" / "final").is_dir()


def test_a_worker_node_killed_mid_job_resumes_elsewhere(
    served: tuple[openai.OpenAI, Path], cluster: Any
) -> None:
    client, _ = served
    job = client.fine_tuning.jobs.create(model="tiny-random", training_file=upload(client), method=LONG)
    wait_for(
        client,
        job.id,
        lambda j: (
            j.status == "running" and any(m.startswith("Checkpoint created") for m in messages(client, j.id))
        ),
    )
    pid = training_pid(job.id)
    assert pid is not None
    node = cluster.worker_of(pid)
    assert node is not None
    cluster.kill_worker(node)  # the node and the job's process with it, as a machine that dies
    try:
        done = wait_for(client, job.id, lambda j: j.status in DONE, timeout=400)
        assert done.status == "succeeded", done.error
        said = messages(client, job.id)
        lost = [m for m in said if "was lost on the Ray cluster" in m]
        assert (
            len(lost) == 1
            and "retrying from the checkpoint at step" in lost[0]
            and "(retry 1 of 2)" in lost[0]
        )
        assert any(m.startswith("Fine-tuning job resumed from step") for m in said)
        runs = cluster.jobs(job.id)
        assert runs[f"{job.id}-1"] == "FAILED" and runs[f"{job.id}-2"] == "SUCCEEDED" and len(runs) == 2
    finally:
        cluster.add_worker()
        cluster.wait_for_nodes(3)


def test_the_api_killed_and_restarted_follows_the_same_ray_job(cluster: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "service"
    key = new_key(data_dir, "acme")
    proc, url = start_server(data_dir, flags=ray_flags(cluster))
    try:
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        job = client.fine_tuning.jobs.create(model="tiny-random", training_file=upload(client), method=LONG)
        wait_for(client, job.id, lambda j: j.status == "running" and len(metric_steps(client, j.id)) >= 3)
        pid = training_pid(job.id)
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown: the API process is gone, the Ray job runs on
        proc.wait()
    assert pid is not None and psutil.pid_exists(pid)
    proc, url = start_server(data_dir, flags=ray_flags(cluster))
    try:
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        done = wait_for(client, job.id, lambda j: j.status in DONE, timeout=300)
        assert done.status == "succeeded", done.error
        assert cluster.jobs(job.id) == {f"{job.id}-1": "SUCCEEDED"}  # one Ray job, followed again
        said = messages(client, job.id)
        assert f"The service restarted; it follows Ray job {job.id}-1 again" in said
        steps = metric_steps(client, job.id)
        assert steps == list(range(1, LONG_STEPS + 1))  # every step once: nothing was trained twice
        # the Ray job's output is in train.log once: the restarted service copied on from where it was
        log = (data_dir / "jobs" / job.id / "train.log").read_text()
        assert log.count(f"Running entrypoint for job {job.id}-1") == 1
    finally:
        stop_server(proc)


def test_chat_from_an_inference_replica_on_the_cluster(cluster: Any, tmp_path: Path) -> None:
    """`--inference-replicas 1`: chat completions are answered by an inference worker the cluster runs as
    a Ray job (reached over TCP with the API's token), which loads the base model and a fine-tuned adapter
    on demand; no inference worker runs beside the API, and the replica stops listening once the API has
    connected (tests/server/test_inference_pool.py checks that a connection without the token is refused)."""
    data_dir = tmp_path / "service"
    key = new_key(data_dir, "acme")
    proc, url = start_server(data_dir, flags=(*ray_flags(cluster), "--inference-replicas", "1"))
    try:
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        job = client.fine_tuning.jobs.create(model="tiny-random", training_file=upload(client), method=MEDIUM)
        done = wait_for(client, job.id, lambda j: j.status in DONE, timeout=300)
        assert done.status == "succeeded", done.error
        answers = {}
        for model in ("tiny-random", done.fine_tuned_model):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
            )
            answers[model] = reply.choices[0].message.content
            assert reply.usage.completion_tokens > 0
        streamed = client.chat.completions.create(
            model=done.fine_tuned_model,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            == answers[done.fine_tuned_model]
        )
        assert list(cluster.jobs("tunery-inference-").values()) == ["RUNNING"]
        workers = [
            p
            for p in psutil.process_iter(["cmdline"])
            if "tunery.server.inference" in (p.info["cmdline"] or [])
        ]
        assert len(workers) == 1 and "--listen" in workers[0].info["cmdline"]  # none beside the API
        assert cluster.worker_of(workers[0].pid) is not None  # on a worker node
        # the replica takes one connection, the API's, and listens no more
        listening = [c for c in workers[0].net_connections(kind="tcp") if c.status == "LISTEN"]
        assert listening == []  # it stopped listening once the API connected
    finally:
        stop_server(proc)
    deadline = time.monotonic() + 60
    while "RUNNING" in cluster.jobs("tunery-inference-").values():
        assert time.monotonic() < deadline, "the inference replica outlived the API"
        time.sleep(0.5)
