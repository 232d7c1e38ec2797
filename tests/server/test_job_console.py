"""The serve console: one line per job status change on the `tunery.server` logger (stderr under `tunery
serve`), whoever made the change (the scheduler, an API call), with why when the change has a reason."""

from __future__ import annotations

import logging
import re
import time

import pytest

from tests.server.conftest import TERMINAL, Api, chat_lines, jsonl

FOUR_STEPS = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 5}}}


def lines(caplog: pytest.LogCaptureFixture, job_id: str, until: str = "", timeout: float = 10) -> list[str]:
    """The job's console lines, once one containing `until` is there (the line follows the commit the
    API already sees)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            (r.levelname, r.getMessage())
            for r in caplog.records
            if r.name == "tunery.server" and r.getMessage().startswith(f"job {job_id} ")
        ]
        if any(until in message for _, message in found) or time.monotonic() > deadline:
            return [f"{level} {message}" for level, message in found]
        time.sleep(0.02)


def test_a_job_from_creation_to_success(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunery.server")
    job = api.create_job(method=FOUR_STEPS)
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "succeeded"
    head = f"job {job['id']} (acme, sft on tiny-random)"
    found = lines(caplog, job["id"], "succeeded")
    assert found[:3] == [
        f"INFO {head} created, validating files",
        f"INFO {head} queued",
        f"INFO {head} running",
    ]
    assert len(found) == 4
    assert re.fullmatch(
        rf"INFO {re.escape(head)} succeeded in \d+s: model {done['fine_tuned_model']}", found[3]
    )


def test_failed_and_cancelled_jobs(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunery.server")
    failing = api.create_job(jsonl([*chat_lines(9), fail_line()]))
    assert api.wait_status(failing["id"], *TERMINAL)["status"] == "failed"
    assert lines(caplog, failing["id"], "failed")[-1] == (
        f"WARNING job {failing['id']} (acme, sft on tiny-random) failed: "
        "the loss is NaN at step 2; lower the learning rate"
    )
    few = api.create_job(jsonl(chat_lines(7)))
    assert api.wait_status(few["id"], *TERMINAL)["status"] == "failed"
    assert lines(caplog, few["id"], "failed")[-1] == (
        f"WARNING job {few['id']} (acme, sft on tiny-random) failed: "
        "Training file has 7 examples; at least 10 are required"
    )
    cancelled = api.create_job()
    api.post(f"/fine_tuning/jobs/{cancelled['id']}/cancel")
    found = lines(caplog, cancelled["id"], "cancelled")
    assert found[-1] == f"INFO job {cancelled['id']} (acme, sft on tiny-random) cancelled"
    assert len(found) == len(set(found))


def fail_line() -> dict[str, object]:
    """A chat example whose text makes the fake CLI fail at step 2."""
    return {
        "messages": [
            {"role": "user", "content": "FAIL_TRAINING"},
            {"role": "assistant", "content": "ok"},
        ]
    }


def test_a_retry_and_a_resume_say_why(
    api: Api, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="tunery.server")
    monkeypatch.setenv("FAKE_FAULT", "checkpoint:2:SIGKILL")
    job = api.create_job(method=FOUR_STEPS)
    assert api.wait_status(job["id"], *TERMINAL)["status"] == "succeeded"
    head = f"job {job['id']} (acme, sft on tiny-random)"
    found = lines(caplog, job["id"], "succeeded")
    assert found[:5] == [
        f"INFO {head} created, validating files",
        f"INFO {head} queued",
        f"INFO {head} running",
        f"WARNING {head} queued: The training process was killed by SIGKILL (out of memory?); retrying "
        "from the checkpoint at step 2 (retry 1 of 2)",
        f"INFO {head} running: Fine-tuning job resumed from step 2",
    ]
    assert found[5].startswith(f"INFO {head} succeeded in ") and len(found) == 6

    monkeypatch.setenv("FAKE_FAULT", "checkpoint:1:hang")  # it waits there for the pause's SIGTERM
    paused = api.create_job(method=FOUR_STEPS)
    api.wait(paused["id"], lambda _: any("step 1 with" in e["message"] for e in api.events(paused["id"])))
    api.post(f"/fine_tuning/jobs/{paused['id']}/pause")
    api.wait_status(paused["id"], "paused")
    api.post(f"/fine_tuning/jobs/{paused['id']}/resume")
    assert api.wait_status(paused["id"], *TERMINAL)["status"] == "succeeded"
    head = f"job {paused['id']} (acme, sft on tiny-random)"
    found = lines(caplog, paused["id"], "succeeded")
    assert found[2:6] == [
        f"INFO {head} running",
        f"INFO {head} paused: Pausing the job: a checkpoint is saved at the end of the current step",
        f"INFO {head} queued: Fine-tuning job resumed; it continues from its last checkpoint",
        f"INFO {head} running: Fine-tuning job resumed from step 1",
    ]
