"""What PostgreSQL does differently from SQLite, on both: values it rejects (NaN in JSON, NUL in text, a
string longer than its column, an integer past 2**31), concurrent requests, and connections it drops.
The rest of the API runs on PostgreSQL through the suites in conftest.POSTGRES_MODULES."""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from tests.server.conftest import TERMINAL, Api, chat_lines, fake_settings, jsonl
from tests.server.pg import PostgresCluster
from tunery.cli import main
from tunery.server.app import create_app
from tunery.server.auth import create_key, list_keys
from tunery.server.jobs import add_event
from tunery.server.store import Checkpoint, Job, Store, new_id, now


def test_a_diverging_runs_nan_metrics_are_null(api: Api, settings) -> None:
    job = api.wait_status(api.create_job()["id"], "succeeded")
    store = Store(settings.database_url)
    nan = {"step": 99, "train_loss": math.nan, "valid_loss": math.inf, "per_class": [-math.inf, 1.5]}
    with store.session() as session:
        add_event(session, job["id"], "Step 99: training loss=nan", type="metrics", data=nan)
        session.add(
            Checkpoint(
                id=new_id("ftckpt_"),
                job_id=job["id"],
                project_id=session.get(Job, job["id"]).project_id,
                step_number=99,
                created_at=now(),
                metrics={"step": 99.0, "train_loss": math.nan},
                name="ft:tiny-random:acme::nan:ckpt-step-99",
                path="run/checkpoints/step-99/model",
            )
        )
    store.close()
    r = api.get(f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 1})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["data"] == {
        "step": 99,
        "train_loss": None,
        "valid_loss": None,
        "per_class": [None, 1.5],
    }
    r = api.get(f"/fine_tuning/jobs/{job['id']}/checkpoints")
    assert r.status_code == 200 and r.json()["data"][0]["metrics"] == {"step": 99.0, "train_loss": None}


def test_nul_characters_in_ids_are_not_found(api: Api) -> None:
    file_id = api.upload(jsonl(chat_lines(10)))
    job = api.create_job(training_file=file_id)
    for path in (
        f"/files/{file_id}%00",
        "/files?after=file-%00",
        f"/fine_tuning/jobs/{job['id']}%00",
        f"/fine_tuning/jobs/{job['id']}/events?after=ftevent-%00",
        f"/fine_tuning/jobs/{job['id']}%00/checkpoints",
        "/models/ft:tiny-random:acme::x%00",
    ):
        r = api.get(path)
        assert r.status_code == 404, (path, r.text)
    r = api.post("/fine_tuning/jobs", json={"model": "tiny-random", "training_file": file_id + "\x00"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file"
    r = api.post("/fine_tuning/jobs", json={"model": "ft:tiny-random:acme::x\x00", "training_file": file_id})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_long_names_fit_their_columns(tmp_path: Path, database: str) -> None:
    """A base model named at length (`--base-model NAME=LOCAL`, LOCAL a deep path), the longest suffix: its
    checkpoints' names, longer than 255 characters, start a continued-training job."""
    alias, local = "b" * 180, "/models/" + "deep/" * 60 + "tiny-random"
    settings = fake_settings(tmp_path / "service", base_models={alias: local})
    key = create_key(Store(settings.database_url), "a" * 63)[1]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        api = Api(client, key)
        job = api.wait_status(api.create_job(model=alias, suffix="s" * 64)["id"], "succeeded")
        checkpoint = api.get(f"/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"][-1]
        name = checkpoint["fine_tuned_model_checkpoint"]
        assert len(name) > 255 and api.get(f"/models/{name}").status_code == 200
        dpo = api.create_job(model=name, method={"type": "dpo"})
        assert dpo["model"] == name and dpo["status"] == "validating_files"


def test_times_past_2038(api: Api, settings) -> None:
    job = api.create_job()
    store = Store(settings.database_url)
    with store.session() as session:
        session.get(Job, job["id"]).created_at = 2**31 + 1  # 2038-01-19
    store.close()
    assert api.get(f"/fine_tuning/jobs/{job['id']}").json()["created_at"] == 2**31 + 1


def test_fifty_concurrent_requests(api: Api, other: Api) -> None:
    """Uploads, listings and job polls at once (more than the thread pool): all answered, and paging through
    the files returns each exactly once."""
    job = api.create_job()

    def request(i: int) -> int:
        who = api if i % 2 else other
        if i % 5 == 0:  # a project uploads a few files at a time: past that a 429, retried as clients do
            while True:
                r = who.post(
                    "/files",
                    files={"file": (f"{i}.jsonl", jsonl(chat_lines(10)))},
                    data={"purpose": "fine-tune"},
                )
                if r.status_code != 429:
                    return int(r.status_code)
                time.sleep(0.05)
        if i % 5 == 1:
            return int(who.get("/files", params={"limit": 3}).status_code)
        if i % 5 == 2:
            return int(api.get(f"/fine_tuning/jobs/{job['id']}/events").status_code)
        return int(api.get(f"/fine_tuning/jobs/{job['id']}").status_code)

    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(request, range(150)))
    assert codes == [200] * 150
    # the job's result file is a new file: it must not appear between the pages and the whole list
    api.wait_status(job["id"], *TERMINAL)
    for who in (api, other):
        seen, after = [], None
        while True:
            page = who.get("/files", params={"limit": 4} | ({"after": after} if after else {})).json()
            seen += [f["id"] for f in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert len(seen) == len(set(seen)) == len(who.get("/files").json()["data"])


def test_connections_the_database_dropped_are_replaced(api: Api, database: str, request, caplog) -> None:
    """A database restart (here: its connections killed) costs no failed request and no failed scheduler
    tick: pooled connections are checked before use."""
    if not database:
        pytest.skip("PostgreSQL only: SQLite has no server to drop connections")
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    assert api.get("/files").status_code == 200
    cluster.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{make_url(database).database}' AND pid <> pg_backend_pid()"
    )
    assert api.get("/files").status_code == 200
    assert api.get("/fine_tuning/jobs").status_code == 200
    time.sleep(0.3)  # scheduler ticks
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_keys_cli_with_a_database_url(tmp_path: Path, database: str, capsys, monkeypatch) -> None:
    monkeypatch.delenv("TUNERY_DATABASE_URL", raising=False)
    url = database or f"sqlite:///{tmp_path / 'keys.db'}"
    flags = ["--data-dir", str(tmp_path / "service"), "--database-url", url]
    assert main(["keys", "create", "--project", "initech", *flags]) == 0
    assert capsys.readouterr().out.startswith("sk-tunery-")
    store = Store(url)
    assert [k[1] for k in list_keys(store)] == ["initech"]
    store.close()
    assert not (tmp_path / "service" / "tunery.db").exists()  # the URL, not the data directory's SQLite
