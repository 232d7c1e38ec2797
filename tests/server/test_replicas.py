"""Several `tunery serve` on one database: one schedules at a time (the scheduler lease), every one
answers, a cancel or pause taken by one stops the process the scheduling one runs, and when the
scheduling one goes another takes over within the lease's term. Per-project quotas on waiting jobs.
In process, with the fake CLI, on SQLite and on PostgreSQL; `test_two_live_replicas_on_postgresql`
runs two real `tunery serve` processes and kills one (-m system)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import TERMINAL, Api, databases, fake_settings
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.settings import Settings
from tunery.server.store import Job, LeaseHolder, Store

LONG = {
    "type": "supervised",
    "supervised": {"hyperparameters": {"n_epochs": 40, "batch_size": 5}},
}  # 80 steps
SHORT = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 5}}}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tmp_path" in metafunc.fixturenames and "system" not in metafunc.function.__name__:
        metafunc.parametrize("database", databases(metafunc.module.__name__), indirect=True)


@contextmanager
def replica(settings: Settings, key: str) -> Iterator[tuple[Api, TestClient]]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Api(client, key), client


def new_key(settings: Settings) -> str:
    store = Store(settings.database_url)
    key = create_key(store, "acme")[1]
    store.close()
    return key


def leading(client: TestClient) -> bool:
    return bool(client.app.state.tunery.scheduler.leading)  # type: ignore[attr-defined]


def test_the_lease_is_held_by_one_and_taken_over_when_it_expires(tmp_path: Path, database: str) -> None:
    settings = fake_settings(tmp_path / "service", database_url=database)
    store = Store(settings.database_url)
    first, second = LeaseHolder(store, "scheduler", 0.5), LeaseHolder(store, "scheduler", 0.5)
    assert first.hold() and not second.hold()
    assert first.hold() and first.held() and not second.hold()  # renewed: still first's
    time.sleep(0.7)  # first stopped renewing (it died)
    assert second.hold() and not first.hold() and not first.held()
    second.release()  # a clean stop hands it on at once
    assert first.hold()
    time.sleep(0.7)  # first stalled past its term, and no one took the lease meanwhile: it keeps it
    assert not first.held() and first.hold(own_only=True) and first.held() and not second.hold()
    time.sleep(0.7)
    assert (
        second.hold() and not first.hold(own_only=True) and not first.held()
    )  # taken meanwhile: first's is gone
    store.close()


def test_every_replica_answers_and_one_schedules(tmp_path: Path, database: str, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    settings = fake_settings(tmp_path / "service", database_url=database, scheduler_lease_seconds=1.0)
    key = new_key(settings)
    with ExitStack() as stack:
        (a, a_client), (b, b_client) = (stack.enter_context(replica(settings, key)) for _ in range(2))
        assert leading(a_client) and not leading(b_client)
        running = b.create_job(method=LONG)["id"]  # created through the replica that does not schedule
        queued = b.create_job(method=SHORT)["id"]
        a.wait(running, lambda j: j["status"] == "running")
        assert [j["id"] for j in a.get("/fine_tuning/jobs").json()["data"]] == [
            j["id"] for j in b.get("/fine_tuning/jobs").json()["data"]
        ]
        # a cancel taken by the replica that does not run the process stops it where it runs
        assert b.post(f"/fine_tuning/jobs/{running}/cancel").json()["status"] == "cancelled"
        a.wait(queued, lambda j: j["status"] in TERMINAL)
        assert a.get(f"/fine_tuning/jobs/{queued}").json()["status"] == "succeeded"
        run_dir = settings.jobs_dir / running / "run"
        assert not (run_dir / "summary.json").exists()  # stopped, not run to its end
        store = Store(settings.database_url)
        with store.session() as session:
            job = session.get(Job, running)
            assert job is not None and job.pid is None
        store.close()


def test_the_scheduling_replica_goes_and_another_takes_over(
    tmp_path: Path, database: str, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    settings = fake_settings(tmp_path / "service", database_url=database, scheduler_lease_seconds=1.0)
    key = new_key(settings)
    scheduling = replica(settings, key)
    b, b_client = scheduling.__enter__()
    try:
        with replica(settings, key) as (c, c_client):
            assert leading(b_client) and not leading(c_client)
            job_id = c.create_job(method=LONG)["id"]
            b.wait(job_id, lambda j: j["status"] == "running")
            # a pause taken by the replica that does not schedule: the process checkpoints and stops
            assert c.post(f"/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
            c.wait(job_id, lambda _: any(e["message"].startswith("Job paused") for e in c.events(job_id)))
            assert c.post(f"/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
            steps = len([e for e in c.events(job_id) if e["type"] == "metrics"])
            c.wait(
                job_id, lambda _: len([e for e in c.events(job_id) if e["type"] == "metrics"]) >= steps + 3
            )
            scheduling.__exit__(None, None, None)  # the scheduling replica stops while the job runs ...
            started = time.monotonic()
            while not leading(c_client):  # ... and the other takes over
                assert time.monotonic() - started < 5, "the lease was not taken over"
                time.sleep(0.05)
            done = c.wait_status(job_id, *TERMINAL, timeout=60)
            assert done["status"] == "succeeded", done
            said = [e["message"] for e in reversed(c.events(job_id))]
            assert any(m.startswith("The service restarted; the job will resume from") for m in said), said
    finally:
        scheduling.__exit__(None, None, None)


def test_a_replica_whose_lease_was_taken_stops_scheduling_and_starts_nothing(
    tmp_path: Path, database: str, monkeypatch
) -> None:
    """The scheduling replica stalls past its term and another takes the lease: at its next look it lets
    its processes go (they checkpoint) and starts no new work, not even in the tick that records them."""
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    settings = fake_settings(tmp_path / "service", database_url=database, scheduler_lease_seconds=1.0)
    key = new_key(settings)
    with replica(settings, key) as (api, client):
        scheduler = client.app.state.tunery.scheduler  # type: ignore[attr-defined]
        running = api.create_job(method=LONG)["id"]
        api.wait(running, lambda j: j["status"] == "running")
        queued = api.create_job(method=SHORT)["id"]  # waits for the one training slot
        api.wait(queued, lambda j: j["status"] == "queued")
        with scheduler.lock:  # stalled: the lease runs out and another process takes it
            store = Store(settings.database_url)
            other = LeaseHolder(store, "scheduler", 60.0)
            time.sleep(1.2)
            assert other.hold()
        deadline = time.monotonic() + 10
        while scheduler.leading or scheduler.procs:
            assert time.monotonic() < deadline, "the stalled replica kept scheduling"
            time.sleep(0.05)
        time.sleep(1.0)
        for job_id, status in ((running, "running"), (queued, "queued")):
            assert api.get(f"/fine_tuning/jobs/{job_id}").json()["status"] == status  # for the new holder
        argv = settings.jobs_dir / queued / "argv.jsonl"  # the fake CLI's record of each training command
        assert not argv.exists()  # nothing started it
        assert not scheduler.leading
        other.release()
        store.close()
        done = api.wait_status(running, *TERMINAL, timeout=60)  # the lease came back: recovered, resumed
        assert done["status"] == "succeeded"
        assert api.wait_status(queued, *TERMINAL, timeout=60)["status"] == "succeeded"


def test_a_replica_whose_lease_was_taken_leaves_the_job_to_the_new_holder(
    tmp_path: Path, database: str, monkeypatch
) -> None:
    """A stalls past its term; B takes the lease, stops A's training process and resumes the job in its own.
    When A wakes it must not record its old process's end as the job's: that counted a retry, queued the
    job and cleared its pid while B's process ran, and a later takeover then started a second process on
    the same run directory."""
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    settings = fake_settings(tmp_path / "service", database_url=database, scheduler_lease_seconds=1.0)
    key = new_key(settings)
    with replica(settings, key) as (a, a_client), replica(settings, key) as (_, b_client):
        first, second = a_client.app.state.tunery.scheduler, b_client.app.state.tunery.scheduler  # type: ignore[attr-defined]
        assert first.leading and not second.leading
        job_id = a.create_job(method=LONG)["id"]
        a.wait(job_id, lambda j: j["status"] == "running")
        [old] = first.procs.values()
        with first.lock:  # A stalls; B takes over and resumes the job in a process of its own
            deadline = time.monotonic() + 20
            while (job_id, "train") not in second.procs or old.runner.poll() is None:
                assert time.monotonic() < deadline, "B did not take the job over"
                time.sleep(0.05)
        deadline = time.monotonic() + 10
        while first.leading or first.procs:
            assert time.monotonic() < deadline, "A kept scheduling"
            time.sleep(0.05)
        new_pid = second.procs[(job_id, "train")].runner.pid
        store = Store(settings.database_url)
        with store.session() as session:
            assert session.get(Job, job_id).pid == new_pid  # still B's process
        store.close()
        done = a.wait_status(job_id, *TERMINAL, timeout=60)
        assert done["status"] == "succeeded", done
        said = [e["message"] for e in a.events(job_id)]
        assert not any("retrying" in m for m in said), said
        commands = (settings.jobs_dir / job_id / "argv.jsonl").read_text().splitlines()
        assert len(commands) == 2  # A's first process, B's resume: no third


def test_a_start_that_lands_after_the_lease_was_taken_is_stopped_again(
    tmp_path: Path, database: str, monkeypatch
) -> None:
    """A stalls inside a job's start (a slow Ray submit or disk) while B takes the lease and starts the
    job itself. A's late start used to overwrite the row with its own process (B's then ran unrecorded, and
    the job stayed `running` after B's finished): now it stops its process instead, and B's records."""
    from tunery.server.jobs import scheduler as scheduler_module

    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    settings = fake_settings(tmp_path / "service", database_url=database, scheduler_lease_seconds=1.0)
    key = new_key(settings)
    real_start = scheduler_module.start_training
    started = []

    def slow_first_start(*args, **kwargs):  # type: ignore[no-untyped-def]
        proc = real_start(*args, **kwargs)
        started.append(proc)
        if len(started) == 1:
            time.sleep(2.5)  # the process runs; its start is written to the job's row late
        return proc

    monkeypatch.setattr(scheduler_module, "start_training", slow_first_start)
    with replica(settings, key) as (a, _), replica(settings, key) as (_, b_client):
        job_id = a.create_job(method=LONG)["id"]  # 8 s: A's process cannot finish the job during the stall
        done = a.wait_status(job_id, *TERMINAL, timeout=60)
        assert done["status"] == "succeeded", done
        assert len(started) == 2 and started[0].runner.poll() is not None  # A's late start was stopped
        said = [e["message"] for e in a.events(job_id)]
        assert not any("retrying" in m for m in said), said


def test_a_stalled_replica_no_one_replaced_schedules_on_without_stopping_its_jobs(
    tmp_path: Path, database: str, monkeypatch
) -> None:
    """The only scheduler stalls past its term (a long request held the interpreter): no other process
    took the lease, so its running job goes on in the same process instead of being stopped and resumed."""
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    settings = fake_settings(tmp_path / "service", database_url=database, scheduler_lease_seconds=1.0)
    key = new_key(settings)
    with replica(settings, key) as (api, client):
        scheduler = client.app.state.tunery.scheduler  # type: ignore[attr-defined]
        running = api.create_job(method=LONG)["id"]  # 8 s of steps
        api.wait(running, lambda j: j["status"] == "running")
        [proc] = scheduler.procs.values()
        with scheduler.lock:
            time.sleep(1.5)  # past the term
            assert not scheduler.lease.held() and proc.runner.poll() is None
        done = api.wait_status(running, *TERMINAL, timeout=60)
        assert done["status"] == "succeeded" and scheduler.leading
        assert proc.stop_reason is None  # never stopped
        assert not any("resume" in e["message"] for e in api.events(running))


def test_a_projects_waiting_jobs_are_capped_with_a_429(tmp_path: Path, database: str, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.2")
    settings = fake_settings(tmp_path / "service", database_url=database, project_queued_jobs=2)
    store = Store(settings.database_url)
    keys = {name: create_key(store, name)[1] for name in ("acme", "globex")}
    store.close()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        acme, globex = Api(client, keys["acme"]), Api(client, keys["globex"])
        first = acme.create_job(method=LONG)["id"]
        acme.wait(first, lambda j: j["status"] == "running")
        waiting = [acme.create_job(method=LONG)["id"] for _ in range(2)]
        file_id = acme.upload((settings.jobs_dir / first / "training.jsonl").read_bytes())
        refused = acme.post("/fine_tuning/jobs", json={"model": "tiny-random", "training_file": file_id})
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded"
        assert error["message"] == (
            "This project has 2 fine-tuning jobs waiting to run, the most the service queues for one project "
            "(2); wait for one to start, or cancel one."
        )
        assert globex.create_job(method=SHORT)["status"] == "validating_files"  # another project's queue
        # a paused job does not wait; resuming it would, and is refused the same way. Its slot goes to the
        # first waiting job, and a new one fills the queue again
        acme.post(f"/fine_tuning/jobs/{first}/pause")
        acme.wait(first, lambda _: any(e["message"].startswith("Job paused") for e in acme.events(first)))
        acme.wait(waiting[0], lambda j: j["status"] == "running")
        waiting.append(acme.create_job(method=LONG)["id"])
        assert acme.post(f"/fine_tuning/jobs/{first}/resume").status_code == 429
        acme.post(f"/fine_tuning/jobs/{waiting[1]}/cancel")
        assert acme.post(f"/fine_tuning/jobs/{first}/resume").status_code == 200
        for job_id in [first, *waiting]:
            acme.post(f"/fine_tuning/jobs/{job_id}/cancel")


def test_resources_are_checked_kept_and_shown(api: Api, settings: Settings) -> None:
    job = api.create_job(method=SHORT, resources={"cpus": 2, "memory_gb": 6.5})
    assert job["resources"] == {"cpus": 2.0, "memory_gb": 6.5}
    assert api.create_job(method=SHORT)["resources"] is None
    over = {"model": "tiny-random", "training_file": job["training_file"], "resources": {"gpus": 9}}
    r = api.post("/fine_tuning/jobs", json=over)
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "resources.gpus is 9; this service lets a job ask for at most 8 (its --job-max-gpus)"
    )
    for bad, param in [
        ({"cpus": 0}, "resources.cpus"),
        ({"gpu": 1}, "resources.gpu"),
        ({"memory_gb": -1}, "resources.memory_gb"),
    ]:
        r = api.post(
            "/fine_tuning/jobs",
            json={"model": "tiny-random", "training_file": job["training_file"], "resources": bad},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
    from tunery.server.jobs.processes import job_resources

    store = Store(settings.database_url)
    with store.session() as session:
        row = session.get(Job, job["id"])
        assert row is not None
        asked = job_resources(settings, row)
        assert (asked.cpus, asked.gpus, asked.memory_gb) == (2.0, 0.0, 6.5)
        row.resources, row.method = None, {"type": "dpo", "dpo": {}}
        asked = job_resources(settings, row)  # the defaults: the operator's, then the method's
        assert (asked.cpus, asked.gpus, asked.memory_gb) == (1.0, 0.0, 3.0)
        assert asked.describe() == "1 CPU, 3 GB memory"
        row.resources = {"cpus": 0.01, "memory_gb": 0.5}  # never less than the defaults
        asked = job_resources(settings, row)
        assert (asked.cpus, asked.memory_gb) == (1.0, 3.0)
    store.close()


@pytest.mark.system
def test_two_live_replicas_on_postgresql_system(tmp_path: Path, postgres) -> None:  # type: ignore[no-untyped-def]
    """Two real `tunery serve` processes on one PostgreSQL database and one data directory, the real CLI
    training tiny-random locally: the scheduling one is killed outright (SIGKILL) while a job runs and
    another waits; the other takes over within the lease's term, stops the orphaned training process
    (it checkpoints), and runs both jobs to success."""
    import openai

    from tests.server.conftest import chat_lines, jsonl
    from tests.server.test_openai_client import start_server, stop_server, wait_for

    url = postgres.new_database()
    data_dir = tmp_path / "service"
    env = {**os.environ, "TUNERY_DATABASE_URL": url}
    key = subprocess.run(
        [sys.executable, "-m", "tunery", "keys", "create", "--project", "acme", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    flags = ("--database-url", url)
    first, first_url = start_server(data_dir, "serve-a.log", flags)
    second, second_url = start_server(data_dir, "serve-b.log", flags)
    try:
        a = openai.OpenAI(base_url=first_url, api_key=key, max_retries=0)
        b = openai.OpenAI(base_url=second_url, api_key=key, max_retries=0)
        file_id = b.files.create(file=("t.jsonl", jsonl(chat_lines(20))), purpose="fine-tune").id
        method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 30, "batch_size": 1}}}
        running = b.fine_tuning.jobs.create(model="tiny-random", training_file=file_id, method=method)
        waiting = a.fine_tuning.jobs.create(model="tiny-random", training_file=file_id, method=method)
        wait_for(b, running.id, lambda j: j.status == "running")
        assert a.fine_tuning.jobs.retrieve(waiting.id).status in ("validating_files", "queued")
        assert "scheduling jobs" in (tmp_path / "serve-a.log").read_text()
        assert "scheduling jobs" not in (tmp_path / "serve-b.log").read_text()
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed = time.monotonic()
        while "scheduling jobs" not in (tmp_path / "serve-b.log").read_text():
            assert time.monotonic() - killed < 30, "the second replica did not take over"
            time.sleep(0.2)
        took = time.monotonic() - killed
        assert took < 15  # the lease's term (10 s) and a look
        for job_id in (running.id, waiting.id):
            done = wait_for(
                b, job_id, lambda j: j.status in ("succeeded", "failed", "cancelled"), timeout=300
            )
            assert done.status == "succeeded", done.error
        said = [e.message for e in b.fine_tuning.jobs.list_events(running.id, limit=500)]  # every page
        assert any(m.startswith("Fine-tuning job resumed from step") for m in said), said
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                stop_server(proc)
        postgres.drop_database(url)
