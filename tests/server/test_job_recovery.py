"""No lost jobs: a training process killed by a signal the service did not send is retried from its last
checkpoint (at most `max_job_retries` times, counted across restarts) and can then be resumed by hand; a
run that wrote final/ and summary.json has succeeded whatever its exit status; an error quotes only its
own attempt, without the server's paths. The fake CLI dies on cue: FAKE_FAULT (fake_tunery.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import TERMINAL, Api, chat_lines, databases, fake_settings, jsonl
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.jobs import death_cause, stop_cause
from tunery.server.settings import Settings
from tunery.server.store import Job, Store

FOUR_STEPS = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 5}}}
EIGHT_STEPS = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 5}}}
OOM = "The training process was killed by SIGKILL (out of memory?)"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """On SQLite and on PostgreSQL, as conftest.py does for the modules in its POSTGRES_MODULES."""
    if "tmp_path" in metafunc.fixturenames:  # the tests with a data directory
        metafunc.parametrize("database", databases(metafunc.module.__name__), indirect=True)


def argv(settings: Settings, job_id: str) -> list[list[str]]:
    path = settings.jobs_dir / job_id / "argv.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def messages(api: Api, job_id: str) -> list[str]:
    return [e["message"] for e in reversed(api.events(job_id))]


def metric_steps(api: Api, job_id: str) -> list[int]:
    return [e["data"]["step"] for e in reversed(api.events(job_id)) if e["type"] == "metrics"]


def test_death_causes() -> None:
    assert death_cause(-9) == death_cause(137) == "was killed by SIGKILL (out of memory?)"
    assert death_cause(-11) == death_cause(139) == "was killed by SIGSEGV"
    assert death_cause(-6) == "was killed by SIGABRT" and death_cause(-7) == "was killed by SIGBUS"
    for ordinary in (0, 1, 2, 127, 128, 255):
        assert death_cause(ordinary) is None, ordinary
    stopped = "stopped at step 3/8 (SIGTERM); continue with: tunery train sft --resume run"
    assert stop_cause(stopped) == "was stopped by SIGTERM (not sent by the service)"
    assert stop_cause("the loss is NaN at step 2; lower the learning rate") is None


@pytest.mark.parametrize("action", ["SIGKILL", "137"])  # killed, or a shell's status for it (128 + 9)
def test_a_killed_process_resumes_from_its_checkpoint(api: Api, settings, monkeypatch, action: str) -> None:
    monkeypatch.setenv("FAKE_FAULT", f"checkpoint:2:{action}")
    job = api.create_job(method=FOUR_STEPS)
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "succeeded" and done["error"] is None, done
    assert api.get(f"/models/{done['fine_tuned_model']}").status_code == 200
    first, second = argv(settings, job["id"])
    assert "--resume" not in first and second[second.index("--resume") + 1].endswith(f"{job['id']}/run")
    [retry] = [e for e in api.events(job["id"]) if "retrying" in e["message"]]
    assert retry["message"] == f"{OOM}; retrying from the checkpoint at step 2 (retry 1 of 2)"
    assert retry["level"] == "warn" and retry["data"]["retry"] == 1
    assert "Fine-tuning job resumed from step 2" in messages(api, job["id"])
    assert metric_steps(api, job["id"]) == [1, 2, 3, 4]  # each step reported once across the two processes


def test_a_process_that_keeps_dying_fails_with_the_cause_then_resumes(
    api: Api, settings, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_FAULT", "step:3:SIGKILL")  # every attempt dies before step 3's checkpoint
    job = api.create_job(method=FOUR_STEPS)
    failed = api.wait_status(job["id"], *TERMINAL)
    assert failed["status"] == "failed" and failed["fine_tuned_model"] is None
    assert failed["error"] == {
        "code": "training_process_died",
        "message": (
            "Fine-tuning failed: the training process was killed by SIGKILL (out of memory?) 3 times; the "
            "last checkpoint is at step 2. Resume the job to try again."
        ),
        "param": None,
    }
    assert len(argv(settings, job["id"])) == 3  # the first attempt and max_job_retries = 2 more
    retries = [m for m in messages(api, job["id"]) if "retrying" in m]
    assert retries == [
        f"{OOM}; retrying from the checkpoint at step 2 (retry 1 of 2)",
        f"{OOM}; retrying from the checkpoint at step 2 (retry 2 of 2)",
    ]

    monkeypatch.delenv("FAKE_FAULT")  # the memory was freed
    resumed = api.post(f"/fine_tuning/jobs/{job['id']}/resume")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["status"] == "queued" and resumed.json()["error"] is None
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "succeeded" and done["finished_at"]
    assert "--resume" in argv(settings, job["id"])[3] and len(argv(settings, job["id"])) == 4
    assert (
        "Fine-tuning job resumed after its training process died; it continues from the checkpoint at step 2"
        in messages(api, job["id"])
    )
    assert metric_steps(api, job["id"]) == [1, 2, 3, 4]
    again = api.post(f"/fine_tuning/jobs/{job['id']}/resume")
    assert again.status_code == 400 and again.json()["error"]["code"] == "job_not_paused"
    assert "only paused jobs, and failed jobs whose training process died" in again.json()["error"]["message"]


def test_a_resumed_job_gets_its_retries_again(api: Api, settings, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_FAULT", "step:2:SIGKILL")
    job = api.create_job(method=FOUR_STEPS)
    assert api.wait_status(job["id"], *TERMINAL)["error"]["code"] == "training_process_died"
    assert api.post(f"/fine_tuning/jobs/{job['id']}/resume").status_code == 200
    failed = api.wait_status(job["id"], *TERMINAL)
    assert failed["error"]["message"].startswith(
        "Fine-tuning failed: the training process was killed by SIGKILL (out of memory?) 3 times; the last "
        "checkpoint is at step 1."
    )
    assert len(argv(settings, job["id"])) == 6


def test_an_error_exit_is_not_retried_and_quotes_only_its_own_attempt(
    api: Api, settings, monkeypatch
) -> None:
    # attempt 1 is stopped by a SIGTERM the service did not send: its log ends with the recipe's
    # "tunery: error: stopped at step 2/4 (SIGTERM); continue with: ... --resume /.../run"; attempt 2
    # crashes with a traceback whose last line names the interpreter, the run directory and sys.prefix
    monkeypatch.setenv("FAKE_FAULT", "checkpoint:2:SIGTERM,step:3:raise")
    job = api.create_job(method=FOUR_STEPS)
    failed = api.wait_status(job["id"], *TERMINAL)
    assert failed["error"] == {
        "code": "training_failed",
        "message": (
            "Fine-tuning failed: the training process exited with status 1: RuntimeError: fake crash at "
            "step:3 (python python, run run, library PYTHON_PREFIX/lib)"
        ),
        "param": None,
    }
    assert len(argv(settings, job["id"])) == 2  # the crash was not retried
    assert (
        "The training process was stopped by SIGTERM (not sent by the service); retrying from the "
        "checkpoint at step 2 (retry 1 of 2)" in messages(api, job["id"])
    )
    log = (settings.jobs_dir / job["id"] / "train.log").read_text()
    assert "stopped at step 2/4 (SIGTERM)" in log and f"$ {sys.executable}" in log  # what is not quoted
    refused = api.post(f"/fine_tuning/jobs/{job['id']}/resume")  # a retry cannot fix a deterministic error
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "job_not_paused"


def test_a_silent_exit_does_not_quote_the_command_line(api: Api, settings, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_FAULT", "step:1:3")  # exit status 3 without a word of output
    failed = api.wait_status(api.create_job(method=FOUR_STEPS)["id"], *TERMINAL)
    assert failed["error"]["code"] == "training_failed"
    assert (
        failed["error"]["message"]
        == "Fine-tuning failed: the training process exited with status 3: no output"
    )


def test_a_kill_after_the_final_model_is_a_success(api: Api, settings, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_FAULT", "summary:SIGKILL")
    job = api.create_job(method=FOUR_STEPS)
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "succeeded" and done["trained_tokens"] == 4000, done
    assert api.get(f"/models/{done['fine_tuned_model']}").status_code == 200
    assert len(argv(settings, job["id"])) == 1
    said = messages(api, job["id"])
    assert f"{OOM} after it had saved the final model and its summary" in said
    assert said[-1] == "The job has successfully completed"


def test_a_partial_summary_is_not_the_end_of_a_run(api: Api, settings, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_FAULT", "partial_summary:SIGKILL")  # final/ and 20 bytes of summary.json
    job = api.create_job(method=FOUR_STEPS)
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "succeeded", done
    assert f"{OOM}; retrying from the checkpoint at step 4 (retry 1 of 2)" in messages(api, job["id"])
    assert len(argv(settings, job["id"])) == 2


def test_a_file_check_error_quotes_only_its_own_attempt(api: Api) -> None:
    training, validation = chat_lines(10), chat_lines(10)
    training[0]["messages"][1]["content"] = "FAKE_CHECK_NOTE"  # its check writes a line to validate.log
    validation[0]["messages"][1]["content"] = "FAKE_CHECK_KILL"  # its check dies without a word
    job = api.create_job(jsonl(training), validation_file=api.upload(jsonl(validation)))
    failed = api.wait_status(job["id"], *TERMINAL)
    assert failed["error"] == {
        "code": "invalid_validation_file",
        "message": (
            "The job failed due to an invalid validation file. The file check was killed by SIGKILL "
            "(out of memory?): no output"
        ),
        "param": "validation_file",
    }


# --- across restarts ----------------------------------------------------------------------------------------


def new_key(settings: Settings) -> str:
    store = Store(settings.database_url)
    key = create_key(store, "acme")[1]
    store.close()
    return key


@contextmanager
def serve(settings: Settings, key: str) -> Iterator[Api]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Api(client, key)


def crashed(settings: Settings, job_id: str) -> None:
    """The server stopped cleanly (the job checkpointed and stayed `running`): make it look as if the
    server had died and its training process with it, i.e. a `running` job whose pid is gone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store = Store(settings.database_url)
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "running" and job.pid is None
        job.pid = gone.pid
    store.close()


def checkpointed(api: Api, job_id: str, step: int) -> dict[str, Any]:
    return api.wait(
        job_id,
        lambda _: any(m.startswith(f"Checkpoint created at step {step} ") for m in messages(api, job_id)),
    )


def test_a_process_gone_at_restart_counts_as_a_retry(tmp_path: Path, database: str, monkeypatch) -> None:
    settings = fake_settings(tmp_path / "service", database_url=database, max_job_retries=1)
    key = new_key(settings)
    monkeypatch.setenv("FAKE_FAULT", "checkpoint:2:hang")  # the process waits there for the server's SIGTERM
    with serve(settings, key) as api:
        job_id = api.create_job(method=EIGHT_STEPS)["id"]
        checkpointed(api, job_id, 2)
    crashed(settings, job_id)
    monkeypatch.setenv("FAKE_FAULT", "checkpoint:3:hang")
    with serve(settings, key) as api:
        assert (
            "The training process ended while the service was down; retrying from the checkpoint at step 2 "
            "(retry 1 of 1)" in messages(api, job_id)
        )
        checkpointed(api, job_id, 3)
    crashed(settings, job_id)
    with serve(settings, key) as api:  # the retry is used up: no third run in a loop of crashes
        failed = api.get(f"/fine_tuning/jobs/{job_id}").json()
        assert failed["status"] == "failed", failed
        assert failed["error"]["message"] == (
            "Fine-tuning failed: the training process ended while the service was down 2 times; the last "
            "checkpoint is at step 3. Resume the job to try again."
        )
        monkeypatch.delenv("FAKE_FAULT")
        assert api.post(f"/fine_tuning/jobs/{job_id}/resume").status_code == 200
        assert api.wait_status(job_id, *TERMINAL)["status"] == "succeeded"
        assert metric_steps(api, job_id) == list(range(1, 9))
    assert len(argv(settings, job_id)) == 3


def test_a_run_that_finished_while_the_server_was_down_succeeds(
    tmp_path: Path, database: str, monkeypatch
) -> None:
    settings = fake_settings(tmp_path / "service", database_url=database)
    key = new_key(settings)
    monkeypatch.setenv("FAKE_FAULT", "checkpoint:2:hang")
    with serve(settings, key) as api:
        job_id = api.create_job(method=FOUR_STEPS)["id"]
        checkpointed(api, job_id, 2)
    run_dir = settings.jobs_dir / job_id / "run"  # it finished while nobody watched
    (run_dir / "final").mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"steps": 4, "trained_tokens": 4000}))
    crashed(settings, job_id)
    with serve(settings, key) as api:
        done = api.get(f"/fine_tuning/jobs/{job_id}").json()
        assert done["status"] == "succeeded" and done["trained_tokens"] == 4000, done
        assert api.get(f"/models/{done['fine_tuned_model']}").status_code == 200
    assert len(argv(settings, job_id)) == 1
