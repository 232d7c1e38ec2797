"""`tunery serve --inference-workers N`: chat completions answered by several worker processes. A model's
requests go to the worker that has it loaded while it is no busier than another; requests at once spread
over the workers."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import Api
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.settings import Settings
from tunery.server.store import Store

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, Settings, TestClient]]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("pool") / "service", inference_workers=2)
    key = create_key(Store(settings.database_url), "acme")[1]
    with TestClient(create_app(settings, run_scheduler=False), raise_server_exceptions=False) as client:
        yield Api(client, key), settings, client


def workers(client: TestClient) -> list:  # type: ignore[type-arg]
    return list(client.app.state.tunery.inference.workers)  # type: ignore[attr-defined]


def pids(client: TestClient) -> list[int | None]:
    return [
        w._proc.pid if w._proc is not None and w._proc.returncode is None else None for w in workers(client)
    ]


def complete(api: Api, tokens: int) -> dict:  # type: ignore[type-arg]
    body = {"model": "tiny-random", "messages": HELLO, "max_tokens": tokens, "temperature": 0}
    r = api.post("/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_one_model_one_at_a_time_stays_on_one_worker(pool) -> None:  # type: ignore[no-untyped-def]
    api, _, client = pool
    first = complete(api, 4)
    second = complete(api, 4)
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    started = pids(client)
    assert started[0] is not None and started[1] is None  # no second worker loaded the same model


def test_requests_at_once_spread_over_the_workers(pool) -> None:  # type: ignore[no-untyped-def]
    api, settings, client = pool
    answers: list[dict] = []  # type: ignore[type-arg]
    threads = [threading.Thread(target=lambda: answers.append(complete(api, 64))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(answers) == 4
    assert len({a["choices"][0]["message"]["content"] for a in answers}) == 1  # greedy: the same everywhere
    started = pids(client)
    assert None not in started and started[0] != started[1]  # the second worker was started for them
    assert (settings.logs_dir / "inference.log").is_file() and (
        settings.logs_dir / "inference-1.log"
    ).is_file()


def test_an_inference_replica_refuses_a_connection_without_its_token(tmp_path: Path) -> None:
    """The listening worker, started here as the cluster would: a connection that sends anything but the
    token is closed unanswered, and the one with it gets the protocol."""
    token = tmp_path / "token"
    token.write_text("s3cret-token")
    announce = tmp_path / "address.json"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunery.server.inference",
            "--listen",
            "--token-file",
            str(token),
            "--announce",
            str(announce),
        ],
        stderr=(tmp_path / "worker.log").open("wb"),
    )
    try:
        deadline = time.monotonic() + 60
        while not announce.exists():
            assert worker.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        address = json.loads(announce.read_text())
        with socket.create_connection((address["host"], address["port"]), timeout=30) as wrong:
            wrong.sendall(b"not-the-token\n" + json.dumps({"id": 1, "op": "chat"}).encode() + b"\n")
            try:
                said = wrong.recv(100)
            except ConnectionResetError:  # closed with the rest of what was sent unread
                said = b""
            assert said == b""  # closed, nothing said
        with socket.create_connection((address["host"], address["port"]), timeout=120) as right:
            right.sendall(b"s3cret-token\n")
            ready = right.makefile("r").readline()
            assert json.loads(ready)["event"] == "ready"
        assert worker.wait(timeout=60) == 0  # the connection closed: the worker exits
        assert "refused a connection from 127.0.0.1: wrong token" in (tmp_path / "worker.log").read_text()
    finally:
        if worker.poll() is None:
            worker.kill()


def test_a_missing_job_and_an_unanswering_cluster_are_told_apart(tmp_path: Path) -> None:
    """Following a Ray job again: only the cluster's "no such job" (404) means it is gone; an error answer
    or no answer means "ask again later", never "the job died" (which would start a second run)."""
    from tunery.server.jobs.executors import ClusterUnavailable, RayExecutor

    class Cluster:
        def __init__(self, error: Exception | None) -> None:
            self.error = error

        def get_job_info(self, name: str) -> object:
            if self.error is not None:
                raise self.error
            return object()

    executor = RayExecutor.__new__(RayExecutor)
    executor.client = Cluster(RuntimeError("Request failed with status code 404: Job j-1 does not exist."))
    assert executor.attach("j-1", tmp_path / "train.log") is None
    executor.client = Cluster(None)
    assert executor.attach("j-1", tmp_path / "train.log") is not None
    for error in (
        RuntimeError("Request failed with status code 503: unavailable."),
        ConnectionError("refused"),
    ):
        executor.client = Cluster(error)
        with pytest.raises(ClusterUnavailable):
            executor.attach("j-1", tmp_path / "train.log")
