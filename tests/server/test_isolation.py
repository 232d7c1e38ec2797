"""One tenant against another through the API: python graders that reach for the service's database or
sleep on its threads, and the caps that keep one project from filling the service's queues."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import Api, chat_lines, jsonl
from tunery.graders import sandbox
from tunery.graders.sandbox import SandboxStatus
from tunery.server.app import create_app
from tunery.server.errors import APIError
from tunery.server.inference_client import InferenceClient
from tunery.server.settings import Settings

confined = pytest.mark.skipif(
    not sandbox.sandbox_status().confined
    and __import__("os").environ.get("TUNERY_TEST_REQUIRE_SANDBOX") != "1",
    reason="no kernel sandbox for python graders here",
)


def python_grader(source: str) -> dict[str, Any]:
    return {"type": "python", "name": "attack", "source": source}


@confined
def test_a_grader_cannot_open_the_service_database_to_forge_a_key(
    api: Api, other: Api, settings: Settings
) -> None:
    """Project globex's grader ATTACHes DATA_DIR/tunery.db from an in-memory database, as the attack that
    read every key hash and added an admin key for acme did."""
    api.upload(b'{"messages": []}\n', "acme-private.jsonl")
    database = settings.data_dir / "tunery.db"
    forged = "sk-tunery-forged-key"
    source = (
        "import sqlite3\n"
        "def grade(sample, item):\n"
        "    db = sqlite3.connect(':memory:')\n"
        f"    db.execute('ATTACH DATABASE ? AS t', ({str(database)!r},))\n"
        "    rows = db.execute('SELECT project_id FROM t.api_keys').fetchall()\n"
        '    db.execute("INSERT INTO t.api_keys (id, project_id, key_hash, prefix, created_at, role) "\n'
        "               \"VALUES ('key_forged', ?, ?, 'sk-tunery-forg', 0, 'admin')\",\n"
        f"               (rows[0][0], {hashlib.sha256(forged.encode()).hexdigest()!r}))\n"
        "    db.commit()\n"
        "    return float(len(rows))\n"
    )
    r = other.post(
        "/fine_tuning/alpha/graders/run", json={"grader": python_grader(source), "model_sample": "x"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["reward"] == 0.0 and body["metadata"]["errors"]["python_grader_runtime_error"] is True
    assert "unable to open database" in body["metadata"]["errors"]["python_grader_runtime_error_details"]
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT count(*) FROM api_keys WHERE id = 'key_forged'").fetchone() == (0,)
    stolen = api.client.get("/v1/files", headers={"Authorization": f"Bearer {forged}"})
    assert stolen.status_code == 401


@confined
def test_sleeping_graders_of_one_project_do_not_stall_the_others(
    settings: Settings, keys: dict[str, str]
) -> None:
    """42 concurrent runs of a grader that sleeps once froze every endpoint for everyone (the API's 40
    threads). Now globex gets 4 runs in flight and 429s for the rest, while acme's requests, python
    graders included, are answered before globex's sleepers wake."""
    settings.grader_timeout = 30
    sleeper = python_grader("import time\ndef grade(sample, item):\n    time.sleep(2)\n    return 1.0\n")
    quick = python_grader("def grade(sample, item):\n    return 0.5\n")

    async def scenario() -> tuple[list[httpx.Response], list[bool], httpx.Response, httpx.Response]:
        app = create_app(settings, run_scheduler=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
            acme = {"Authorization": f"Bearer {keys['acme']}"}
            globex = {"Authorization": f"Bearer {keys['globex']}"}
            body = {"grader": sleeper, "model_sample": "x"}
            flood = [
                asyncio.create_task(
                    client.post("/v1/fine_tuning/alpha/graders/run", json=body, headers=globex)
                )
                for _ in range(42)
            ]
            await asyncio.sleep(1.0)  # let the flood arrive and start its sandboxes
            files = await client.get("/v1/files", headers=acme)
            run = {"grader": quick, "model_sample": "x"}
            graded = await client.post("/v1/fine_tuning/alpha/graders/run", json=run, headers=acme)
            still_sleeping = [not task.done() for task in flood]
            return list(await asyncio.gather(*flood)), still_sleeping, files, graded

    flood, still_sleeping, files, graded = asyncio.run(scenario())
    assert files.status_code == 200 and graded.status_code == 200 and graded.json()["reward"] == 0.5
    accepted = [k for k, r in enumerate(flood) if r.status_code == 200]
    refused = [r for r in flood if r.status_code == 429]
    assert len(accepted) == settings.work_per_project and len(refused) == 42 - len(accepted)
    assert refused[0].json()["error"]["code"] == "rate_limit_exceeded" and refused[0].headers["retry-after"]
    assert all(still_sleeping[k] for k in accepted)  # acme was answered while they slept
    assert all(flood[k].json()["reward"] == 1.0 for k in accepted)


def test_python_graders_are_refused_where_the_sandbox_cannot_run(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        sandbox, "sandbox_status", lambda: SandboxStatus(False, "bubblewrap is not installed")
    )
    monkeypatch.delenv(sandbox.UNCONFINED_ENV, raising=False)
    grader = python_grader("def grade(sample, item):\n    return 1.0\n")
    multi = {"type": "multi", "name": "m", "graders": {"p": grader}, "calculate_output": "p"}
    for path, body in (
        ("/fine_tuning/alpha/graders/run", {"grader": grader, "model_sample": "x"}),
        ("/fine_tuning/alpha/graders/validate", {"grader": multi}),
    ):
        r = api.post(path, json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "python_grader_unavailable" and "bubblewrap" in error["message"]
    prompts = api.upload(b'{"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}\n' * 10)
    job = {
        "training_file": prompts,
        "model": "tiny-random",
        "method": {"type": "reinforcement", "reinforcement": {"grader": grader}},
    }
    r = api.post("/fine_tuning/jobs", json=job)
    assert r.status_code == 400 and r.json()["error"]["param"] == "method.reinforcement.grader"


def test_inference_requests_are_capped_per_project(settings: Settings) -> None:
    """A project cannot fill the inference worker's queue: past `inference_per_project` requests in
    flight it gets 429s, while another project is still admitted."""

    class Blocked(InferenceClient):
        async def _stream(self, request: dict[str, Any], project: str) -> AsyncIterator[dict[str, Any]]:
            await asyncio.sleep(3600)
            yield {}

    async def scenario() -> tuple[int, int, int, int]:
        client = Blocked(settings)
        flood = [asyncio.create_task(client.call({"op": "chat"}, "flood")) for _ in range(20)]
        await asyncio.sleep(0.1)
        quiet = asyncio.create_task(client.call({"op": "chat"}, "quiet"))
        await asyncio.sleep(0.1)
        refused = sum(1 for t in flood if t.done() and getattr(t.exception(), "status", 0) == 429)
        admitted, other = client.admission.in_flight("flood"), client.admission.in_flight("quiet")
        for task in [*flood, quiet]:
            task.cancel()
        await asyncio.gather(*flood, quiet, return_exceptions=True)
        return refused, admitted, other, client.admission.in_flight()

    refused, admitted, other, left = asyncio.run(scenario())
    assert admitted == settings.inference_per_project and refused == 20 - admitted and other == 1
    assert left == 0  # cancelled requests give their places back


def test_a_lone_surrogate_is_a_400_and_a_failed_grader_run_is_on_record(
    api: Api, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grader named "\\ud800" (a valid JSON escape that is no text) made a 500 when echoed back; and a
    grader run that failed left no record of the code that ran."""
    import json

    check = {"type": "string_check", "name": "\ud800", "operation": "eq", "input": "a", "reference": "a"}
    body = json.dumps({"grader": check, "model_sample": "a"})
    headers = api.headers | {"content-type": "application/json"}
    for path in ("/fine_tuning/alpha/graders/run", "/fine_tuning/alpha/graders/validate"):
        r = api.client.post("/v1" + path, content=body, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    paired = json.dumps({"grader": check | {"name": "\U0001f600"}, "model_sample": "a"})  # escaped pair
    assert (
        api.client.post("/v1/fine_tuning/alpha/graders/run", content=paired, headers=headers).status_code
        == 200
    )

    def broken(*args: Any) -> dict[str, Any]:
        raise RuntimeError("the grader run broke")

    monkeypatch.setattr("tunery.server.graders.run_here", broken)
    r = api.post(
        "/fine_tuning/alpha/graders/run", json={"grader": check | {"name": "x"}, "model_sample": "a"}
    )
    assert r.status_code == 500
    log = [json.loads(line) for line in (settings.audit_dir / "acme.jsonl").read_text().splitlines()]
    runs = [entry["payload"] for entry in log if entry["type"] == "grader.run"]
    assert runs[-1]["failed"] == "RuntimeError: the grader run broke" and runs[-2]["failed"] is None


@confined
def test_a_requests_python_graders_share_one_time_budget(api: Api, settings: Settings) -> None:
    """Each python sub-grader of a multi had the whole timeout: a grader of many sleepers held a worker for
    their sum. Now they share the request's timeout."""
    settings.grader_timeout = 3
    sleeper = "import time\ndef grade(sample, item):\n    time.sleep(2)\n    return 1.0\n"
    multi = {
        "type": "multi",
        "name": "sleepers",
        "graders": {name: python_grader(sleeper) | {"name": name} for name in ("a", "b", "c")},
        "calculate_output": "a + b + c",
    }
    r = api.post("/fine_tuning/alpha/graders/run", json={"grader": multi, "model_sample": "x"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sub_rewards"]["a"] == 1.0 and body["sub_rewards"]["c"] == 0.0
    assert body["metadata"]["errors"]["unresponsive_reward_error"] is True
    too_many = {**multi, "graders": {f"g{k}": python_grader(sleeper) | {"name": f"g{k}"} for k in range(17)}}
    too_many["calculate_output"] = "g0"
    r = api.post("/fine_tuning/alpha/graders/validate", json={"grader": too_many})
    assert r.status_code == 400 and "at most 16" in r.json()["error"]["message"]


def test_work_is_cancelled_when_the_client_hangs_up() -> None:
    """A plain (not streamed) answer was computed to its end after the client had gone."""
    from tunery.server.deps import unless_gone

    class HangsUp:
        async def receive(self) -> dict[str, Any]:
            await asyncio.sleep(0.1)
            return {"type": "http.disconnect"}

    async def scenario() -> bool:
        work = asyncio.ensure_future(asyncio.sleep(3600))
        # a plain error for the route (audited, no crash in the server's log), not a cancellation
        with pytest.raises(APIError) as caught:
            await unless_gone(HangsUp(), work)  # type: ignore[arg-type]
        assert caught.value.status == 499 and caught.value.code == "client_closed"
        return work.cancelled()

    assert asyncio.run(scenario())

    class StaysOn:
        async def receive(self) -> dict[str, Any]:
            await asyncio.sleep(3600)
            return {"type": "http.request"}

    async def stopping() -> None:  # the request itself cancelled (the server stopping): still a cancellation
        waiting = asyncio.ensure_future(unless_gone(StaysOn(), asyncio.sleep(3600)))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(stopping())


def test_the_training_slot_is_shared_between_projects(
    settings: Settings, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job of one project that trains for days kept every other project's jobs queued. With a free slot
    a project without a running job goes first; with none, a job that has trained for its turn checkpoints
    at its next step, gives the slot to the waiting project and continues afterwards from there."""
    from fastapi.testclient import TestClient

    from tests.server.conftest import TERMINAL

    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    settings.job_turn_minutes = 1.0 / 60  # a turn of one second
    hp = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 5}}}
    long = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 30, "batch_size": 5}}}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        acme, globex = Api(client, keys["acme"]), Api(client, keys["globex"])
        first = acme.create_job(method=long)  # 60 steps: 6 s, far longer than a turn
        acme.wait(first["id"], lambda j: j["status"] == "running")
        second = acme.create_job(method=hp)  # acme's own next job: queued behind globex's
        other = globex.create_job(method=hp)
        done = globex.wait_status(other["id"], *TERMINAL, timeout=60)
        assert done["status"] == "succeeded"
        assert acme.get(f"/fine_tuning/jobs/{second['id']}").json()["status"] == "queued"
        finished = acme.wait_status(first["id"], *TERMINAL, timeout=60)
        assert finished["status"] == "succeeded"
        messages = [e["message"] for e in acme.events(first["id"])]
        assert any("gives up its training slot" in m for m in messages)
        assert any(m.startswith("Fine-tuning job resumed from step") for m in messages)
        assert acme.wait_status(second["id"], *TERMINAL, timeout=60)["status"] == "succeeded"


def test_a_projects_slow_file_check_does_not_hold_up_anothers(api: Api, other: Api) -> None:
    """File checks ran one at a time for every project: a huge file (minutes to screen) made every other
    project's jobs wait in validating_files."""
    slow = api.create_job(training=jsonl([*chat_lines(10), "FAKE_CHECK_SLOW"]))
    api.wait(slow["id"], lambda j: any(e["message"].startswith("Validating") for e in api.events(j["id"])))
    quick = other.create_job()
    assert other.wait_status(quick["id"], "queued", "running", "succeeded")["status"] != "validating_files"
    assert api.get(f"/fine_tuning/jobs/{slow['id']}").json()["status"] == "validating_files"
    assert api.post(f"/fine_tuning/jobs/{slow['id']}/cancel").status_code == 200


def test_stalled_uploads_are_capped_and_timed_out(
    settings: Settings, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty uploads that stopped sending held 374 MB of partial files for as long as their sockets
    stayed open. A project now gets four uploads at a time (then 429), and a body that sends nothing for
    BODY_IDLE_SECONDS gets a 408 and its partial file removed."""
    from tunery.server import middleware

    monkeypatch.setattr(middleware, "BODY_IDLE_SECONDS", 0.5)
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
    ).encode()

    async def scenario() -> tuple[list[int], int, list[str]]:
        app = create_app(settings, run_scheduler=False)
        release = asyncio.Event()

        async def stalled() -> AsyncIterator[bytes]:
            yield head + b'{"messages": []}\n' * 1000
            await release.wait()
            yield f"\r\n--{boundary}--\r\n".encode()

        async def never_finishes() -> AsyncIterator[bytes]:
            yield head + b'{"messages": []}\n'
            await asyncio.sleep(3)

        transport = httpx.ASGITransport(app=app)
        headers = {
            "Authorization": f"Bearer {keys['acme']}",
            "content-type": f"multipart/form-data; boundary={boundary}",
        }
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
            # four held (each waits for `release`), the fifth of the project refused at once
            held = [
                asyncio.create_task(client.post("/v1/files", content=stalled(), headers=headers))
                for _ in range(middleware.UPLOADS_PER_PROJECT)
            ]
            await asyncio.sleep(0.2)
            third = await client.post("/v1/files", content=stalled(), headers=headers)
            release.set()
            statuses = [(await task).status_code for task in held]
            timed_out = await client.post("/v1/files", content=never_finishes(), headers=headers)
            leftovers = [p.name for p in settings.files_dir.iterdir() if p.name.startswith(".tmp-")]
        return [*statuses, third.status_code], timed_out.status_code, leftovers

    statuses, timed_out, leftovers = asyncio.run(scenario())
    assert statuses == [200] * middleware.UPLOADS_PER_PROJECT + [429]
    assert timed_out == 408 and leftovers == []
