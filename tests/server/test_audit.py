"""The service's audit log, in process: chat completions (streamed or not, answered or failed), a job's
life, file and model deletion become records of the caller's project and key; `tunery audit` reads them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import TERMINAL, Api
from tunery import cli
from tunery.safety.audit import verify
from tunery.server.app import create_app
from tunery.server.errors import APIError
from tunery.server.settings import Settings

HELLO = [{"role": "user", "content": "Hello, I am jane.doe@gmail.com"}]


class FakeInference:
    """Stands in for the inference worker: a fixed answer, in two deltas when streamed; a model named
    `broken` fails the way a model that cannot load does."""

    async def call(self, request: dict[str, Any], project: str = "") -> dict[str, Any]:
        return await anext(r["result"] async for r in self.stream(request) if r["event"] == "done")

    async def stream(self, request: dict[str, Any], project: str = "") -> AsyncIterator[dict[str, Any]]:
        if request["model"] == "broken":
            raise APIError(400, "The model could not be loaded.", "model")
        for text in ("Hi ", "there"):
            yield {"event": "delta", "index": 0, "text": text}
        choice = {"index": 0, "text": "Hi there", "finish_reason": "stop", "logprobs": None}
        yield {"event": "done", "result": {"choices": [choice], "prompt_tokens": 5, "completion_tokens": 2}}

    async def close(self) -> None:
        pass


@pytest.fixture
def audited(settings: Settings, keys: dict[str, str]) -> Iterator[Api]:
    settings.base_models["broken"] = "broken"
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.app.state.tunery.inference = FakeInference()  # type: ignore[attr-defined]
        yield Api(client, keys["acme"])


def records(settings: Settings, project: str = "acme") -> list[dict[str, Any]]:
    path = settings.audit_dir / f"{project}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chat_requests_and_answers_are_recorded(
    audited: Api, settings: Settings, keys: dict[str, str]
) -> None:
    first = audited.post(
        "/chat/completions", json={"model": "tiny-random", "messages": HELLO, "max_tokens": 7}
    )
    assert first.status_code == 200, first.text
    with audited.client.stream(
        "POST",
        "/v1/chat/completions",
        headers=audited.headers,
        json={"model": "tiny-random", "messages": HELLO, "stream": True},
    ) as stream:
        assert [line for line in stream.iter_lines() if line][-1] == "data: [DONE]"
    r = audited.post("/chat/completions", json={"model": "broken", "messages": HELLO})
    assert r.status_code == 400

    log = records(settings)
    assert [(x["type"], x["payload"].get("stream")) for x in log] == [
        ("inference.request", False),
        ("inference.response", None),
        ("inference.request", True),
        ("inference.response", None),
        ("inference.request", False),
        ("inference.error", None),
    ]
    request, response = log[0]["payload"], log[1]["payload"]
    assert request["completion_id"] == response["completion_id"] == first.json()["id"]
    assert request["model"] == "tiny-random" and request["messages"] == HELLO
    assert request["params"]["max_new_tokens"] == 7
    assert response["choices"] == [{"index": 0, "text": "Hi there", "finish_reason": "stop"}]
    assert response["usage"] == {"prompt_tokens": 5, "completion_tokens": 2}
    assert log[3]["payload"]["choices"][0]["text"] == "Hi there"  # streamed, recorded when it ended
    assert log[5]["payload"]["error"]["message"] == "The model could not be loaded."
    # refused before it ran: its text is not kept, only its size and digest (a tenant sending megabytes
    # that are refused at once cannot fill the disk with them)
    refused = log[4]["payload"]
    text = json.dumps(HELLO, sort_keys=True, separators=(",", ":")).encode()  # its canonical JSON
    assert refused["messages"] == {"bytes": len(text), "sha256": hashlib.sha256(text).hexdigest()}
    assert refused["summarised"] == ["messages"] and "summarised" not in request
    assert refused["model"] == "broken"
    assert {x["actor"]["project"] for x in log} == {"acme"}
    assert all(x["actor"]["key_id"].startswith("key_") for x in log)
    assert keys["acme"] not in (settings.audit_dir / "acme.jsonl").read_text()  # the key id, never the key
    assert verify(settings.audit_dir / "acme.jsonl").ok


def test_a_job_life_is_recorded(audited: Api, settings: Settings, keys: dict[str, str]) -> None:
    job = audited.create_job(suffix="audit")
    assert audited.wait_status(job["id"], *TERMINAL)["status"] == "succeeded"
    cancelled = audited.create_job()
    audited.post(f"/fine_tuning/jobs/{cancelled['id']}/cancel")
    done = audited.wait_status(job["id"], "succeeded")
    assert audited.delete(f"/models/{done['fine_tuned_model']}").status_code == 200
    assert audited.delete(f"/files/{job['training_file']}").status_code == 200
    Api(audited.client, keys["globex"]).upload(b'{"messages": []}\n')

    log = records(settings)
    mine = [x for x in log if x["payload"].get("job_id") == job["id"]]
    types = [x["type"] for x in mine]
    assert types[0] == "job.created" and mine[0]["payload"]["suffix"] == "audit"
    statuses = [(x["payload"]["from"], x["payload"]["to"]) for x in mine if x["type"] == "job.status"]
    assert statuses == [("validating_files", "queued"), ("queued", "running"), ("running", "succeeded")]
    messages = [x["payload"]["message"] for x in mine if x["type"] == "job.event"]
    assert f"Created fine-tuning job: {job['id']}" in messages
    assert "The job has successfully completed" in messages
    assert not any(x["payload"].get("data", {}).get("train_loss") for x in mine)  # per-step metrics are not
    # the API's actions carry the caller's key; the scheduler's carry none
    assert mine[0]["actor"]["key_id"].startswith("key_")
    assert all(x["actor"]["key_id"] is None for x in mine if x["type"] == "job.status")
    cancel = [x for x in log if x["type"] == "job.status" and x["payload"]["job_id"] == cancelled["id"]]
    assert cancel[-1]["payload"]["to"] == "cancelled" and cancel[-1]["actor"]["key_id"].startswith("key_")
    by_type = {x["type"]: x["payload"] for x in log}
    assert by_type["model.deleted"] == {
        "model": done["fine_tuned_model"],
        "kind": "fine-tuned",
        "job_id": job["id"],
    }
    assert by_type["file.deleted"]["file_id"] == job["training_file"]
    assert by_type["file.uploaded"]["purpose"] == "fine-tune"
    assert [x["type"] for x in records(settings, "globex")] == ["file.uploaded"]
    assert verify(settings.audit_dir / "acme.jsonl").ok


def test_cli_verify_export_and_head(audited: Api, settings: Settings, capsys, tmp_path: Path) -> None:
    audited.upload(b'{"messages": []}\n')
    audited.post("/chat/completions", json={"model": "tiny-random", "messages": HELLO})
    data_dir = ["--data-dir", str(settings.data_dir)]
    assert cli.main(["audit", "verify", "--all", *data_dir]) == 0
    assert "acme: intact, 3 records" in capsys.readouterr().out

    assert cli.main(["audit", "head", "--project", "acme", *data_dir]) == 0
    head = json.loads(capsys.readouterr().out)
    assert head["seq"] == 3
    witness = f"{head['seq']}:{head['hash']}"
    assert cli.main(["audit", "verify", "--project", "acme", "--witness", witness, *data_dir]) == 0

    out = tmp_path / "export.csv"
    argv = [
        "audit",
        "export",
        "--project",
        "acme",
        "--type",
        "inference",
        "--format",
        "csv",
        "--out",
        str(out),
    ]
    assert cli.main([*argv, *data_dir]) == 0
    assert "wrote 2 records (seq 2-3)" in capsys.readouterr().out
    assert json.loads(Path(f"{out}.manifest.json").read_text())["records"] == 2

    path = settings.audit_dir / "acme.jsonl"
    path.write_text(path.read_text().replace("Hi there", "Hi thereX", 1))
    assert cli.main(["audit", "verify", "--project", "acme", *data_dir]) == 1
    assert "line 3 (seq 3): content edited" in capsys.readouterr().out
    assert cli.main(["audit", "verify", "--project", "nobody", *data_dir]) == 2
    assert "no audit log for project 'nobody'" in capsys.readouterr().err


def test_redaction_and_no_audit(settings: Settings, keys: dict[str, str]) -> None:
    settings.audit_redact = True
    with TestClient(create_app(settings, run_scheduler=False)) as client:
        client.app.state.tunery.inference = FakeInference()  # type: ignore[attr-defined]
        Api(client, keys["acme"]).post("/chat/completions", json={"model": "tiny-random", "messages": HELLO})
    request = records(settings)[0]
    assert request["redacted"] and request["payload"]["messages"][0]["content"] == "Hello, I am [EMAIL]"

    settings.audit, before = False, len(records(settings))
    with TestClient(create_app(settings, run_scheduler=False)) as client:
        client.app.state.tunery.inference = FakeInference()  # type: ignore[attr-defined]
        Api(client, keys["acme"]).post("/chat/completions", json={"model": "tiny-random", "messages": HELLO})
    assert len(records(settings)) == before


def test_moderations_are_recorded(audited: Api, settings: Settings) -> None:
    r = audited.post("/moderations", json={"input": ["Thanks, that helped!", "Call me at 415-867-5309"]})
    assert r.status_code == 200, r.text
    (record,) = records(settings)
    assert record["type"] == "moderation" and record["payload"]["id"] == r.json()["id"]
    assert record["payload"]["input"] == ["Thanks, that helped!", "Call me at 415-867-5309"]
    assert record["payload"]["flagged"] == [False, False]
    assert record["payload"]["personal_data"] == [[], ["phone"]]


def test_reads_grader_runs_keys_and_failed_logins_are_recorded(
    audited: Api, settings: Settings, capsys: Any
) -> None:
    file_id = audited.upload(b'{"messages": []}\n', "private.jsonl")
    assert audited.get(f"/files/{file_id}/content").status_code == 200
    grader = {"type": "string_check", "name": "s", "operation": "eq", "input": "a", "reference": "a"}
    assert (
        audited.post("/fine_tuning/alpha/graders/run", json={"grader": grader, "model_sample": "a"}).json()[
            "reward"
        ]
        == 1.0
    )
    data_dir = ["--data-dir", str(settings.data_dir)]
    assert cli.main(["keys", "create", "--project", "acme", "--labeller", "Ann", *data_dir]) == 0
    key_id = capsys.readouterr().err.split("(")[1].split(",")[0]
    assert cli.main(["keys", "revoke", key_id, *data_dir]) == 0
    kinds = {r["type"]: r for r in records(settings)}
    assert kinds["file.content_read"]["payload"]["file_id"] == file_id
    assert kinds["grader.run"]["payload"]["reward"] == 1.0
    assert kinds["key.created"]["payload"] | {"user": None} == {
        "key_id": key_id,
        "labeller": "Ann",
        "via": "tunery keys",
        "user": None,
    }
    assert kinds["key.revoked"]["payload"]["key_id"] == key_id

    # failed authentication belongs to no project: the service's own log, one record a minute per
    # client and reason, then the count of those left out
    for _ in range(5):
        bad = audited.client.get(
            "/v1/files", headers={"Authorization": "Bearer sk-tunery-not-a-real-key-at-all"}
        )
        assert bad.status_code == 401
    assert audited.client.get("/v1/files").status_code == 401  # no key: another reason
    failed = records(settings, "_service")
    assert [(r["type"], r["payload"]["code"]) for r in failed] == [
        ("auth.failed", "invalid_api_key"),
        ("auth.failed", "missing_api_key"),
    ]
    assert "sk-tunery-not-a-real-key-at-all" not in json.dumps(failed)  # masked
    # the middleware's window, shortened to see the count of those left out
    limits = next(m for m in _middlewares(audited.client.app) if hasattr(m, "failures"))
    limits.failures.window = 0.0
    audited.client.get("/v1/files", headers={"Authorization": "Bearer sk-tunery-not-a-real-key-at-all"})
    assert records(settings, "_service")[-1]["payload"]["left_out_before"] == 4
    assert cli.main(["audit", "verify", "--all", *data_dir]) == 0


def _middlewares(app: Any) -> list[Any]:
    found, layer = [], app.middleware_stack
    while layer is not None:
        found.append(layer)
        layer = getattr(layer, "app", None)
    return found


def test_a_grader_run_on_a_large_sample_is_recorded_by_its_digest(audited: Api, settings: Settings) -> None:
    """A 4 MB sample graded 16 times at once had written 61 MB to the log in 0.7 s: a field past the
    bound is kept as its size and SHA-256, the small ones and the result as they are."""
    from tunery.server.routes.graders import AUDIT_DATA_BYTES

    grader = {
        "type": "string_check",
        "name": "s",
        "operation": "like",
        "input": "{{sample.output_text}}",
        "reference": "{{item.word}}",
    }
    sample = "word " * (AUDIT_DATA_BYTES // 5 + 1)  # just past the bound once quoted
    body = {"grader": grader, "model_sample": sample, "item": {"word": "word"}}
    assert audited.post("/fine_tuning/alpha/graders/run", json=body).json()["reward"] == 1.0
    small = {"grader": grader, "model_sample": "a word", "item": {"word": "word"}}
    assert audited.post("/fine_tuning/alpha/graders/run", json=small).json()["reward"] == 1.0
    large, plain = [r["payload"] for r in records(settings) if r["type"] == "grader.run"]
    text = json.dumps(sample).encode()
    assert large["model_sample"] == {"bytes": len(text), "sha256": hashlib.sha256(text).hexdigest()}
    assert large["summarised"] == ["model_sample"] and large["item"] == {"word": "word"}
    assert large["grader"] == grader and large["reward"] == 1.0
    assert plain["model_sample"] == "a word" and "summarised" not in plain
    assert verify(settings.audit_dir / "acme.jsonl").ok


def test_a_projects_grader_runs_are_limited_a_minute(settings: Settings, keys: dict[str, str]) -> None:
    """String checks of 60 KB fields from three connections had written 83 MB of audit log a second: runs
    past the project's rate are refused with a 429 before anything runs or is recorded; other projects
    are not held back."""
    limited = dataclasses.replace(settings, grader_runs_per_minute=3)
    grader = {"type": "string_check", "name": "s", "operation": "eq", "input": "a", "reference": "a"}
    body = {"grader": grader, "model_sample": "a"}
    with TestClient(create_app(limited), raise_server_exceptions=False) as client:
        acme, other = Api(client, keys["acme"]), Api(client, keys["globex"])
        assert [acme.post("/fine_tuning/alpha/graders/run", json=body).status_code for _ in range(3)] == [
            200
        ] * 3
        refused = acme.post("/fine_tuning/alpha/graders/run", json=body)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert "at most 3 a minute" in refused.json()["error"]["message"]
        assert other.post("/fine_tuning/alpha/graders/run", json=body).status_code == 200
    assert len([r for r in records(limited) if r["type"] == "grader.run"]) == 3
