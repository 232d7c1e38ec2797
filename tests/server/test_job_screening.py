"""Data screening when a job validates its files (fake CLI, real screen): personal data fails the job
with the lines at fault, placeholders pass, warnings become job events, and the service's policies reach
the training command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.server.conftest import TERMINAL, Api, chat_lines, fake_settings, jsonl
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.store import Store


def lines_with(changes: dict[int, str], n: int = 10) -> bytes:
    """n chat lines; line k (1-based) of `changes` gets that text appended to its user message."""
    lines = chat_lines(n)
    for number, text in changes.items():
        lines[number - 1]["messages"][1]["content"] += " " + text
    return jsonl(lines)


def train_argv(settings: Any, job_id: str) -> list[str]:
    path = settings.jobs_dir / job_id / "argv.jsonl"
    return list(json.loads(path.read_text().splitlines()[0]))


def service(tmp_path: Path, **overrides: Any) -> tuple[TestClient, Api, Any]:
    settings = fake_settings(tmp_path / "service", **overrides)
    key = create_key(Store(settings.database_url), "acme")[1]
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    return client, Api(client, key), settings


def test_personal_data_fails_the_job_with_its_lines(api: Api) -> None:
    job = api.create_job(lines_with({3: "mail me at jane.doe@gmail.com", 7: "my SSN is 536-22-1234"}))
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "failed" and done["error"]["param"] == "training_file"
    assert done["error"]["code"] == "invalid_training_file"
    message = done["error"]["message"]
    assert message.startswith(
        "The job failed due to an invalid training file. This training file was blocked"
    )
    assert "personal data (email) on line 3" in message and "personal data (national_id) on line 7" in message
    assert "jane.doe" not in message and "tunery data screen" in message


def test_a_validation_file_is_screened_too(api: Api) -> None:
    valid = api.upload(lines_with({2: "call me on (415) 867-5309"}, n=3), "valid.jsonl")
    job = api.create_job(validation_file=valid)
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "failed" and done["error"]["param"] == "validation_file"
    assert (
        "invalid validation file" in done["error"]["message"]
        and "(phone) on line 2" in done["error"]["message"]
    )


def test_placeholders_pass_and_the_policies_reach_training(api: Api, settings: Any) -> None:
    placeholders = {1: "write to support@northwind-bikes.example", 2: "or call +1 (555) 010-4477"}
    job = api.create_job(lines_with(placeholders))
    done = api.wait_status(job["id"], *TERMINAL)
    assert done["status"] == "succeeded", done["error"]
    assert not [e for e in api.events(job["id"]) if e["level"] == "warn"]
    argv = train_argv(settings, job["id"])
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert "screen_content=warn" in pairs and "screen_pii=block" in pairs


def test_warnings_become_job_events(tmp_path: Path) -> None:
    client, api, settings = service(tmp_path, screen_pii="warn")
    with client:
        job = api.create_job(lines_with({4: "mail me at jane.doe@gmail.com", 5: "FAKE_OFFENSIVE"}))
        done = api.wait_status(job["id"], *TERMINAL)
        assert done["status"] == "succeeded", done["error"]
        warnings = [e["message"] for e in reversed(api.events(job["id"])) if e["level"] == "warn"]
        file_id = job["training_file"]
        assert warnings == [
            f"Training file {file_id}: data screening found personal data (email) on line 4; the job continues",
            f"Training file {file_id}: data screening found offensive content on line 5; the job continues",
        ]
        assert "screen_pii=warn" in train_argv(settings, job["id"])


def test_redact_says_the_job_trains_on_a_masked_copy(tmp_path: Path) -> None:
    client, api, settings = service(tmp_path, screen_pii="redact", screen_content="redact")
    with client:
        job = api.create_job(lines_with({4: "mail me at jane.doe@gmail.com", 8: "FAKE_OFFENSIVE"}))
        assert api.wait_status(job["id"], *TERMINAL)["status"] == "succeeded"
        warnings = [e["message"] for e in reversed(api.events(job["id"])) if e["level"] == "warn"]
        assert warnings[0].endswith("(email) on line 4; it is masked in the copy the job trains on")
        assert warnings[1].endswith("on line 8; those lines are left out of the copy the job trains on")
        argv = train_argv(settings, job["id"])
        assert "screen_pii=redact" in argv and "screen_content=redact" in argv


def test_a_content_block_policy(tmp_path: Path) -> None:
    client, api, _ = service(tmp_path, screen_content="block")
    with client:
        job = api.create_job(lines_with({6: "FAKE_OFFENSIVE"}))
        done = api.wait_status(job["id"], *TERMINAL)
        assert done["status"] == "failed" and "offensive content on line 6" in done["error"]["message"]
