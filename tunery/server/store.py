"""The service's database: projects and API keys, files, jobs, events and checkpoints (SQLAlchemy 2.x).

SQLite under the data directory by default (WAL mode, so polling readers never wait on the scheduler's
writes); a PostgreSQL URL works the same (`postgresql+psycopg://USER@HOST/DB`, with the `postgres` extra:
`pip install 'tunery[postgres]'`); the service tests run on both. Times are Unix seconds, as the OpenAI
API returns them (BigInteger: past 2038). File contents and run directories live on disk under the data
directory; rows hold only their ids, never a name a user chose.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import string
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from anyio import to_thread
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from tunery.errors import TuneryError

T = TypeVar("T")

ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(ALPHABET) for _ in range(length))


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    key_hash: Mapped[str] = mapped_column(
        String(64), unique=True
    )  # sha256 of the key; the key is never stored
    prefix: Mapped[str] = mapped_column(String(32))  # shown by `tunery keys list`
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # admin: the whole API; labeller: only the feedback studio's labelling endpoints (auth.py)
    role: Mapped[str] = mapped_column(String(16), default="admin", server_default="admin")
    name: Mapped[str | None] = mapped_column(String(64), default=None)  # a labeller's display name


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer, index=True, default=0)  # upload order
    filename: Mapped[str] = mapped_column(String(255))  # as uploaded: shown, never used as a path
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, default=None)

    @property
    def expired(self) -> bool:
        """Past its `expires_after`: gone for the API (as on OpenAI), its bytes removed at the next sweep."""
        return self.expires_at is not None and self.expires_at < now()


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer, index=True)  # creation order (newest-first listing)
    queue_seq: Mapped[int] = mapped_column(Integer, default=0)  # order in the queue (set when queued)
    # model names are Text: they grow with the configured base models' names, and a local model may be a path
    model: Mapped[str] = mapped_column(Text)  # as requested: a base model or a fine-tuned model
    base_model: Mapped[str] = mapped_column(Text)  # the API name of the base model
    local_model: Mapped[str] = mapped_column(Text)  # what `tunery train --model` gets
    parent_adapter: Mapped[str | None] = mapped_column(Text, default=None)  # continued training
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), default=None)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"type", "<type>": {"hyperparameters", ...}}
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    seed: Mapped[int] = mapped_column(Integer)
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, default=None)
    integrations: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    status: Mapped[str] = mapped_column(String(32), index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    model_key: Mapped[str] = mapped_column(String(16))  # the 8-character id in the fine-tuned model name
    fine_tuned_model: Mapped[str | None] = mapped_column(Text, default=None, index=True)
    model_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, default=None)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)  # from file validation
    pid: Mapped[int | None] = mapped_column(Integer, default=None)  # the training process, while running
    # the Ray job of the current attempt while it is on the cluster (`--executor ray`), so a restarted
    # service follows it again rather than starting another
    ray_job: Mapped[str | None] = mapped_column(String(96), default=None)
    # what a training process asks of a node (`--executor ray`): {"cpus", "gpus", "memory_gb"} as given
    resources: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    last_step: Mapped[int] = mapped_column(Integer, default=-1)  # newest step reported (GRPO has a step 0)
    total_steps: Mapped[int | None] = mapped_column(Integer, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # training processes started


class Event(Base):
    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    name: Mapped[str] = mapped_column(Text, index=True)  # fine_tuned_model_checkpoint
    path: Mapped[str] = mapped_column(Text)  # the adapter directory, relative to the job directory
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class Lease(Base):
    """A role one of several `tunery serve` processes on a database holds at a time (the scheduler): taken
    by the first to find it free or expired, kept by renewing it before `expires_at`."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)


class Store:
    """An engine and a session factory. `session()` is one transaction: committed on success; `watch()`
    hears of what each transaction committed."""

    def __init__(self, url: str) -> None:
        kwargs: dict[str, Any] = {}
        database: Path | None = None  # an SQLite database file
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                database = Path(path)
                database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                _make_private(database)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            # a connection the server dropped (a restart) is replaced before use, not failed on; and the pool
            # holds one per worker thread (anyio's 40) plus the event loop's and the scheduler's, so a
            # request on the event loop never waits for a connection
            kwargs |= {"pool_pre_ping": True, "pool_size": 10, "max_overflow": 35}
        self.engine: Engine = create_engine(url, json_serializer=_json, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        if self.engine.dialect.driver == "psycopg":
            event.listen(self.engine, "connect", _psycopg_nul_free_text)
        if database is not None:
            _check_intact(self.engine, database)
        Base.metadata.create_all(self.engine)
        add_missing_columns(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.in_process = url.startswith("sqlite")

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def watch(self, flushed: Callable[[Session], list[T]], committed: Callable[[list[T]], None]) -> None:
        """Hear of what the store's sessions commit, and only that. `flushed(session)` runs after every
        flush, while `session.new` and `session.dirty` still hold the rows written (with each attribute's
        history), and returns what to keep of them; once the transaction commits, `committed(kept)` gets
        what all its flushes kept, in order. A rollback drops it. For records of changes written after the
        commit (the audit log, the serve console: jobs/audit.py); `committed` must not raise, as the
        transaction is committed already."""
        key = object()  # this watcher's entries in `session.info`

        def after_flush(session: Session, _context: Any) -> None:
            session.info.setdefault(key, []).extend(flushed(session))

        def after_commit(session: Session) -> None:
            kept = session.info.pop(key, [])
            if kept:
                committed(kept)

        def after_rollback(session: Session, _transaction: Any) -> None:
            session.info.pop(key, None)

        event.listen(self._sessions, "after_flush", after_flush)
        event.listen(self._sessions, "after_commit", after_commit)
        event.listen(self._sessions, "after_soft_rollback", after_rollback)

    async def read(self, query: Callable[[Session], T]) -> T:
        """Run a short read-only `query(session)` for an `async` route. In-process SQLite answers the polled
        endpoints in a fraction of a millisecond, less than a hand-off to a worker thread costs, so it runs
        on the event loop; a database across a socket (PostgreSQL) runs in a thread, never blocking it."""
        if self.in_process:
            with self.session() as session:
                return query(session)

        def run() -> T:
            with self.session() as session:
                return query(session)

        return await to_thread.run_sync(run)

    def close(self) -> None:
        self.engine.dispose()


class LeaseHolder:
    """This process's claim on the lease `name`: `hold()` takes it when free or expired and renews it while
    held, in one conditional UPDATE (atomic on SQLite and PostgreSQL alike). A holder that dies stops
    renewing, and another takes the lease over `seconds` later. Expiry compares the replicas' clocks:
    keep them in time (NTP) and `seconds` well above their drift."""

    def __init__(self, store: Store, name: str, seconds: float) -> None:
        self.store, self.name, self.seconds = store, name, seconds
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.until = 0.0  # while time.time() is below this, the lease is ours

    def hold(self, own_only: bool = False) -> bool:
        """Take the lease when free or expired, renew it while held. `own_only`: renew it only if it still
        names this holder, even past its term: then no other process took it meanwhile (taking it writes
        the taker's name), so nothing was scheduled behind this one's back."""
        now = time.time()
        expires = now + self.seconds
        mine = Lease.holder == self.holder
        try:
            with self.store.engine.begin() as connection:
                taken = connection.execute(
                    update(Lease)
                    .where(Lease.name == self.name)
                    .where(mine if own_only else mine | (Lease.expires_at < now))
                    .values(holder=self.holder, expires_at=expires)
                ).rowcount
            if not taken and not own_only:
                with suppress(IntegrityError), self.store.engine.begin() as connection:
                    connection.execute(
                        insert(Lease).values(name=self.name, holder=self.holder, expires_at=expires)
                    )
                    taken = 1
        except (OperationalError, ProgrammingError):
            # the database is away for a moment (or SQLite is busy): what was held stays held until its
            # term ends, so a short blip does not stop the jobs; a lapsed one is not claimed back unseen
            return False if own_only else self.held()
        self.until = expires if taken else 0.0
        return bool(taken)

    def held(self, margin: float = 0.0) -> bool:
        return time.time() + margin < self.until

    def release(self) -> None:
        if not self.until:
            return
        self.until = 0.0
        with suppress(OperationalError, ProgrammingError), self.store.engine.begin() as connection:
            connection.execute(
                update(Lease)
                .where(Lease.name == self.name, Lease.holder == self.holder)
                .values(expires_at=0.0)
            )


def _make_private(database: Path) -> None:
    """The database and SQLite's files beside it are the owner's alone (0600), whatever the umask: they hold
    the API keys' hashes and every job's settings. SQLite gives the -wal and -shm files it makes the
    database's mode; ones an older install left are closed here too."""
    with suppress(FileExistsError):  # made here, not by SQLite with the umask's mode (an empty database)
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for suffix in ("", "-wal", "-shm", "-journal"):
        # absent, or another user's database shared on purpose: theirs to decide
        with suppress(FileNotFoundError, PermissionError):
            database.with_name(database.name + suffix).chmod(0o600)


def _check_intact(engine: Engine, database: Path) -> None:
    """A TuneryError, before anything uses it, for a database that is damaged (a disk fault, a copy taken
    mid-write) or not a database at all: otherwise some requests fail with a 500 and others work.
    `quick_check` reads every page once (about a second per GB)."""
    try:
        with engine.connect() as connection:
            problems = [str(row[0]) for row in connection.execute(text("PRAGMA quick_check"))]
    except DatabaseError as exc:
        name = str(getattr(exc.orig, "sqlite_errorname", ""))
        if not name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            raise  # locked, unreadable, ...: not damage, and SQLite's own message says what
        problems = [str(exc.orig)]
    if problems == ["ok"]:
        return
    engine.dispose()
    found = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    raise TuneryError(
        f"the database {database} is damaged (quick_check: {found}); restore it from a backup or move it "
        "away to start with an empty one"
    )


def add_missing_columns(engine: Engine) -> None:
    """`create_all` makes missing tables, never missing columns: a database made by an older Tunery gets
    the columns added since (each nullable or with a server default, so existing rows stay valid).
    Idempotent; a concurrent process adding the same column first is fine."""
    existing = inspect(engine)
    for table in Base.metadata.sorted_tables:
        if not existing.has_table(table.name):
            continue
        present = {c["name"] for c in existing.get_columns(table.name)}
        for column in table.columns:
            if column.name in present or not (column.nullable or column.server_default is not None):
                continue
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.type.compile(engine.dialect)}"
            default = getattr(column.server_default, "arg", None)
            if isinstance(default, str):
                ddl += f" NOT NULL DEFAULT '{default}'" if not column.nullable else f" DEFAULT '{default}'"
            try:
                with engine.begin() as connection:
                    connection.execute(text(ddl))
            except (OperationalError, ProgrammingError):
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise


def _json(value: Any) -> str:
    """JSON columns: NaN and infinities (a diverging run's metrics) are stored as null. PostgreSQL rejects
    them, and the API answers null for them anyway."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _psycopg_nul_free_text(connection: Any, _record: Any) -> None:
    """PostgreSQL text cannot hold NUL, which SQLite stores: it becomes U+FFFD. An id with a NUL in a URL
    then matches nothing (a 404, not a 500), and a NUL in a log line quoted in an event cannot fail the
    scheduler's write."""
    from psycopg.types.string import StrDumperUnknown  # the driver is the optional `postgres` extra

    class NulFreeStr(StrDumperUnknown):
        def dump(self, obj: str) -> Any:
            return super().dump(obj.replace("\x00", "\ufffd"))

    connection.adapters.register_dumper(str, NulFreeStr)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def remove_expired_files(store: Store, files_dir: Path) -> list[tuple[str, File]]:
    """Delete the rows and bytes of files past their expiry; returns (project name, file) for each. A job
    made from one keeps its own link to the bytes (jobs/create.py), so it is not affected."""
    with store.session() as session:
        rows = session.execute(
            select(File, Project.name)
            .join(Project, Project.id == File.project_id)
            .where(File.expires_at.is_not(None), File.expires_at < now())
        ).all()
        for row, _ in rows:
            session.delete(row)
    for row, _ in rows:
        (files_dir / row.id).unlink(missing_ok=True)
    return [(name, row) for row, name in rows]
