from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import chat_lines, pair_lines
from tests.server.pg import PostgresCluster, unavailable
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.errors import APIError
from tunery.server.settings import Settings
from tunery.server.store import Store

FAKE_CLI = str(Path(__file__).with_name("fake_tunery.py"))
TERMINAL = ("succeeded", "failed", "cancelled")
# Every test of these modules runs twice: on SQLite and on PostgreSQL (a throwaway cluster, pg.py; see
# `databases` for which run).
POSTGRES_MODULES = (
    "test_files",
    "test_jobs",
    "test_models",
    "test_auth_and_errors",
    "test_postgres",
    "test_feedback",
    "test_stored_completions",
)


def jsonl(lines: list[Any]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


class Api:
    """A TestClient with one project's key, and the few calls every test makes."""

    def __init__(self, client: TestClient, key: str) -> None:
        self.client, self.headers = client, {"Authorization": f"Bearer {key}"}

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get("/v1" + path, headers=self.headers, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.client.post("/v1" + path, headers=self.headers, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.client.delete("/v1" + path, headers=self.headers, **kw)

    def upload(self, content: bytes, name: str = "train.jsonl", purpose: str = "fine-tune") -> str:
        r = self.post("/files", files={"file": (name, content)}, data={"purpose": purpose})
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    def create_job(self, training: bytes | None = None, **body: Any) -> dict[str, Any]:
        if "training_file" not in body:
            body["training_file"] = self.upload(training if training is not None else jsonl(chat_lines(10)))
        body.setdefault("model", "tiny-random")
        r = self.post("/fine_tuning/jobs", json=body)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait(
        self, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(f"/fine_tuning/jobs/{job_id}").json()
            if until(job):
                return dict(job)
            assert time.monotonic() < deadline, f"timed out; job is {job['status']}: {job}"
            time.sleep(0.05)

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 30) -> dict[str, Any]:
        return self.wait(job_id, lambda j: j["status"] in statuses, timeout)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"])


def fake_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for the fake CLI, on the test's database (TUNERY_DATABASE_URL; unset: SQLite in `data_dir`)."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": os.environ.get("TUNERY_DATABASE_URL", ""),
        "cli": [FAKE_CLI],
        "python": sys.executable,
        "poll_seconds": 0.05,
        "stop_grace_seconds": 5.0,
    }
    return Settings(**(values | overrides))


def databases(module: str) -> list[Any]:
    """The stores a module's tests run on. Every PostgreSQL run but test_postgres's (the cases where the two
    stores differ: NUL characters, column sizes, dropped connections, ...) is in the system run
    (`pytest -m system`, CI): on both, the server tests take twice as long."""
    short = module.rsplit(".", 1)[-1]
    postgresql = (
        "postgresql" if short == "test_postgres" else pytest.param("postgresql", marks=pytest.mark.system)
    )
    return ["sqlite", postgresql]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module in POSTGRES_MODULES:
        metafunc.parametrize("database", databases(module), indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    cluster = PostgresCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The test's database URL, set as TUNERY_DATABASE_URL, where `fake_settings`, `tunery serve` and
    `tunery keys` find it: "" (SQLite in the data directory), or a new database in the cluster."""
    if getattr(request, "param", "sqlite") == "sqlite":
        monkeypatch.delenv("TUNERY_DATABASE_URL", raising=False)
        yield ""
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    url = cluster.new_database()
    monkeypatch.setenv("TUNERY_DATABASE_URL", url)
    yield url
    cluster.drop_database(url)


@pytest.fixture
def settings(tmp_path: Path, database: str) -> Settings:
    return fake_settings(tmp_path / "service", database_url=database)


@pytest.fixture
def keys(settings: Settings) -> dict[str, str]:
    store = Store(settings.database_url)
    keys = {name: create_key(store, name)[1] for name in ("acme", "globex")}
    store.close()
    return keys


@pytest.fixture
def client(settings: Settings, keys: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def api(client: TestClient, keys: dict[str, str]) -> Api:
    return Api(client, keys["acme"])


@pytest.fixture
def other(client: TestClient, keys: dict[str, str]) -> Api:
    return Api(client, keys["globex"])


__all__ = ["Api", "chat_lines", "jsonl", "pair_lines", "fake_settings", "TERMINAL"]


# --- the feedback studio in process (test_feedback.py, test_stored_completions.py) ----------------------------


class FakeInference:
    """Answers that say who wrote them, so tests can tell the models apart (labellers are never told):
    `{model or job id} says: {question}`, a second sample says it at more length. `broken` cannot load;
    `down = True` fails every request the way a dead worker does."""

    def __init__(self) -> None:
        self.down = False
        self.requests: list[dict[str, Any]] = []

    def answer(self, request: dict[str, Any], index: int) -> str:
        who = Path(request["adapter"]).parts[-3] if request.get("adapter") else request["model"]
        return f"{who} says{' indeed, at length' * index}: {request['messages'][-1]['content']}"

    async def call(self, request: dict[str, Any], project: str = "") -> dict[str, Any]:
        return await anext(r["result"] async for r in self.stream(request) if r["event"] == "done")

    async def stream(self, request: dict[str, Any], project: str = "") -> AsyncIterator[dict[str, Any]]:
        self.requests.append(request)
        if self.down:
            raise APIError(503, "The inference worker stopped; try again.", type="server_error")
        if request["model"] == "broken":
            raise APIError(400, "The model could not be loaded.", "model")
        choices = [
            {"index": i, "text": self.answer(request, i), "finish_reason": "stop", "logprobs": None}
            for i in range(request["n"])
        ]
        for c in choices:
            yield {"event": "delta", "index": c["index"], "text": c["text"]}
        yield {"event": "done", "result": {"choices": choices, "prompt_tokens": 5, "completion_tokens": 4}}

    async def close(self) -> None:
        pass


class Studio(Api):
    """An Api for /tunery/v1 paths (`t*`), besides /v1 ones."""

    def tget(self, path: str, **kw: Any) -> Any:
        return self.client.get("/tunery/v1" + path, headers=self.headers, **kw)

    def tpost(self, path: str, **kw: Any) -> Any:
        return self.client.post("/tunery/v1" + path, headers=self.headers, **kw)

    def tdelete(self, path: str, **kw: Any) -> Any:
        return self.client.delete("/tunery/v1" + path, headers=self.headers, **kw)

    def ok(self, response: Any) -> dict[str, Any]:
        assert response.status_code == 200, response.text
        return dict(response.json())

    def labeller(self, name: str) -> Studio:
        made = self.ok(self.tpost("/labellers", json={"name": name}))
        return Studio(self.client, made["key"])

    def wait_queue(self, queue_id: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            queue = self.ok(self.tget(f"/feedback/queues/{queue_id}"))
            if queue["status"] != "generating":
                return queue
            assert time.monotonic() < deadline, queue
            time.sleep(0.02)

    def press(self, item: dict[str, Any], answer_text: str, **extra: Any) -> dict[str, Any]:
        """Choose the answer whose text is `answer_text`, on whichever side this labeller sees it."""
        side = "left" if item["left"] == answer_text else "right"
        assert item[side] == answer_text
        return self.ok(self.tpost(f"/feedback/items/{item['id']}/labels", json={"choice": side, **extra}))


@pytest.fixture
def fake() -> FakeInference:
    return FakeInference()


@pytest.fixture
def studio(settings: Settings, keys: dict[str, str], fake: FakeInference) -> Iterator[Studio]:
    settings.base_models["broken"] = "broken"
    app = create_app(settings)
    app.state.tunery.inference = fake  # before start-up: generation resumes then
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Studio(client, keys["acme"])


@pytest.fixture
def globex(studio: Studio, keys: dict[str, str]) -> Studio:
    return Studio(studio.client, keys["globex"])
