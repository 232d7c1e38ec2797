"""A throwaway PostgreSQL cluster for the service tests: `initdb` into a temp dir, a server that listens
only on a Unix socket there (no TCP), fsync off; each test gets a fresh database of its own.
PostgreSQL 15 or newer (Debian 12's `postgresql` package).

    cluster = PostgresCluster.start()
    url = cluster.new_database()   # postgresql+psycopg://postgres@/t1?host=/tmp/tunery-pg-.../sock
    cluster.stop()                 # pg_ctl -m immediate, then the directory is removed

PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` user and its commands
run through `runuser`. `unavailable()` says why the tests must be skipped (no binaries, no driver).
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url

DRIVER = "postgresql+psycopg"


def bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    found = shutil.which("initdb")
    candidates = [str(Path(found).parent)] if found else []
    debian = glob.glob("/usr/lib/postgresql/*/bin")  # one directory per major version
    candidates += sorted(debian, key=lambda p: p.split("/")[-2].zfill(4), reverse=True)
    for directory in candidates:
        if all(os.access(Path(directory) / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    return None


def runuser() -> str | None:
    """`runuser`, which runs a command as another user (as root, PostgreSQL's commands run as `postgres`)."""
    for path in (shutil.which("runuser"), "/usr/sbin/runuser", "/sbin/runuser"):
        if path and os.access(path, os.X_OK):
            return path
    return None


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if bin_dir() is None:
        return "PostgreSQL is not installed (initdb and pg_ctl are not on PATH nor in /usr/lib/postgresql)"
    if importlib.util.find_spec("psycopg") is None:
        return "the PostgreSQL driver is not installed: pip install -e '.[postgres]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run PostgreSQL as"
        if runuser() is None:
            return "running as root and `runuser` (util-linux) is missing: PostgreSQL cannot run as root"
    return None


class PostgresCluster:
    def __init__(self, root: Path, bindir: Path) -> None:
        self.root, self.bindir = root, bindir
        self.data, self.sock = root / "data", root / "sock"
        self._names = itertools.count(1)
        # as root, every command runs as `postgres`, which owns the whole directory
        self._as = [str(runuser()), "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @classmethod
    def start(cls) -> PostgresCluster:
        bindir = bin_dir()
        assert bindir is not None, unavailable()
        # in /tmp itself: pytest's own temp dirs are private to root, and a socket path must stay short
        cluster = cls(Path(tempfile.mkdtemp(prefix="tunery-pg-")), bindir)
        try:
            cluster.sock.mkdir()
            if cluster._as:
                user = pwd.getpwnam("postgres")
                for path in (cluster.root, cluster.sock):
                    os.chown(path, user.pw_uid, user.pw_gid)
            cluster._run("initdb", "-D", str(cluster.data), "-U", "postgres", "-A", "trust", "--no-sync")
            options = f"-c listen_addresses='' -k {cluster.sock} -c fsync=off -c full_page_writes=off"
            options += " -c synchronous_commit=off -c max_connections=200"
            log = str(cluster.root / "server.log")
            cluster._run("pg_ctl", "-D", str(cluster.data), "-l", log, "-o", options, "-w", "start")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def url(self, database: str) -> str:
        return f"{DRIVER}://postgres@/{database}?host={self.sock}"

    def new_database(self) -> str:
        """A new, empty database: its SQLAlchemy URL."""
        name = f"t{next(self._names)}"
        self.execute(f"CREATE DATABASE {name} STRATEGY FILE_COPY")  # WAL_LOG: 10x slower here
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database of `new_database`, closing whatever connections a test left open to it."""
        self.execute(f"DROP DATABASE IF EXISTS {make_url(url).database} WITH (FORCE)")

    def execute(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=str(self.sock), user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute(sql.encode())

    def stop(self) -> None:
        """Stop the server at once (nothing in it is worth a clean shutdown) and remove the directory."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        command = [*self._as, str(self.bindir / program), *args]
        done = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}\n{tail}")
