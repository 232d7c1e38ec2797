"""The service's data on disk: private to its owner (directories 0700, the database and uploads 0600,
`tunery serve` under umask 077), no half-written uploads left from a crash, and a damaged database
refused at start-up with a message that says what to do, never a traceback."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.server.conftest import Api, fake_settings, jsonl
from tunery import cli
from tunery.errors import TuneryError
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.store import Store


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which files are world-readable unless the service says otherwise."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_is_private_to_its_owner(tmp_path: Path, umask_022: None) -> None:
    settings = fake_settings(tmp_path / "service")
    settings.data_dir.mkdir()
    settings.data_dir.chmod(0o755)  # an older install's
    with TestClient(create_app(settings, run_scheduler=False), raise_server_exceptions=False) as client:
        key = create_key(client.app.state.tunery.store, "acme")[1]
        file_id = Api(client, key).upload(jsonl([{"prompt": "hi"}]))
        for directory in (settings.data_dir, settings.files_dir, settings.jobs_dir, settings.logs_dir):
            assert mode(directory) == 0o700, directory
        assert mode(settings.audit_dir) == 0o700
        database = settings.data_dir / "tunery.db"
        for path in (database, database.with_name("tunery.db-wal"), database.with_name("tunery.db-shm")):
            assert not path.exists() or mode(path) == 0o600, path
        assert mode(database) == 0o600
        assert mode(settings.files_dir / file_id) == 0o600


def test_tunery_serve_runs_under_umask_077(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    """Every file the service and its worker processes write (runs, logs, exports) is the owner's."""
    seen: dict[str, int] = {}

    def serve(*args: Any, **_: Any) -> None:  # instead of uvicorn: the umask it would run under
        seen["umask"] = os.umask(0o077)
        for app in args:
            if isinstance(app, FastAPI):
                app.state.tunery.store.close()

    monkeypatch.setattr("tunery.server.app.serve", serve)
    assert cli.main(["serve", "--data-dir", str(tmp_path / "service"), "--port", "0"]) == 0
    assert seen["umask"] == 0o077


def test_half_written_uploads_are_removed_at_start(tmp_path: Path) -> None:
    settings = fake_settings(tmp_path / "service")
    settings.files_dir.mkdir(parents=True)
    (settings.files_dir / ".tmp-file-abc").write_bytes(b"x" * 1000)  # a crash mid-upload
    (settings.files_dir / "file-kept").write_bytes(b"{}\n")
    with TestClient(create_app(settings, run_scheduler=False)):
        assert sorted(p.name for p in settings.files_dir.iterdir()) == ["file-kept"]


def damage(database: Path, how: str) -> None:
    if how == "garbage":
        database.write_bytes(b"not a database, just bytes\n" * 200)
        return
    store = Store(f"sqlite:///{database}")
    for i in range(100):  # a database of several pages
        create_key(store, f"project-{i}")
    store.close()
    os.truncate(database, database.stat().st_size // 2)  # a copy cut short


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_a_damaged_database_is_refused_at_start(tmp_path: Path, how: str) -> None:
    settings = fake_settings(tmp_path / "service")
    database = settings.data_dir / "tunery.db"
    database.parent.mkdir(parents=True)
    damage(database, how)
    expected = f"the database {database} is damaged (quick_check: "
    with pytest.raises(TuneryError, match="restore it from a backup or move it away") as raised:
        Store(settings.database_url)
    assert str(raised.value).startswith(expected)
    with pytest.raises(TuneryError):
        create_app(settings)
    done = subprocess.run(
        [sys.executable, "-m", "tunery", "keys", "list", "--data-dir", str(settings.data_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "TUNERY_DATABASE_URL": ""},
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"tunery: error: {expected}")


def test_tunery_serve_says_so_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], umask_022: None
) -> None:
    data_dir = tmp_path / "service"
    data_dir.mkdir()
    damage(data_dir / "tunery.db", "garbage")
    assert cli.main(["serve", "--data-dir", str(data_dir), "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert "Tunery serving" not in out  # no banner for a server that never starts
    assert err.startswith(f"tunery: error: the database {data_dir / 'tunery.db'} is damaged")
