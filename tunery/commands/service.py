"""`tunery serve` (the OpenAI-compatible service) and `tunery keys create | list | revoke` (its API keys)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tunery.commands.data import POLICY_CHOICES
from tunery.errors import TuneryError
from tunery.server.settings import Settings  # torch-free: `tunery --help` stays quick


def service_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="files, jobs and the database (default $TUNERY_HOME/service)")
    p.add_argument("--database-url", help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db")


def service_settings(args: argparse.Namespace) -> Any:
    return Settings.from_env(
        data_dir=Path(args.data_dir) if args.data_dir else None,
        database_url=args.database_url,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from tunery.graders.sandbox import UNCONFINED_ENV
    from tunery.server.app import create_app, serve

    # every file the service and its workers write (uploads, runs, logs, the database) is the owner's alone
    os.umask(0o077)
    settings = service_settings(args)
    settings.host, settings.port = args.host, args.port
    settings.executor = args.executor
    if args.executor == "ray":
        if not args.ray_address:
            raise TuneryError(
                "--executor ray needs --ray-address: the Ray cluster's dashboard address, e.g. "
                "http://HEAD:8265 (from `ray start --head`)"
            )
        settings.ray_address = args.ray_address
    elif args.ray_address:
        raise TuneryError("--ray-address is for --executor ray; add it, or drop --ray-address")
    if args.max_running_jobs is not None:
        settings.max_running_jobs = args.max_running_jobs
    elif args.executor == "ray":
        settings.max_running_jobs = 0  # as many as the cluster holds
    settings.job_cpus, settings.job_gpus, settings.job_memory_gb = (
        args.job_cpus,
        args.job_gpus,
        args.job_memory_gb,
    )
    settings.project_running_jobs, settings.project_queued_jobs = (
        args.project_running_jobs,
        args.project_queued_jobs,
    )
    settings.inference_workers = args.inference_workers
    settings.inference_cache, settings.inference_adapters = args.inference_cache, args.inference_adapters
    if args.inference_replicas and args.executor != "ray":
        raise TuneryError("--inference-replicas places inference on a Ray cluster: add --executor ray")
    settings.inference_replicas = args.inference_replicas
    settings.max_upload_bytes = args.max_upload_mb * 2**20
    settings.stop_grace_seconds = args.stop_grace
    settings.header_seconds = args.header_seconds
    for pair in args.train_set or []:
        field = pair.partition("=")[0].strip()
        if field in ("screen_content", "screen_pii"):  # one knob: it screens each upload too
            flag = "--" + field.replace("_", "-")
            raise TuneryError(
                f"--train-set {pair}: the service screens jobs' files with {flag}, which checks each training "
                f"file before its job starts as well; use {flag} {pair.partition('=')[2].strip() or 'POLICY'}"
            )
    settings.train_overrides = list(args.train_set or [])
    settings.audit = not args.no_audit
    settings.audit_redact, settings.audit_fsync = args.audit_redact, args.audit_fsync
    settings.screen_content, settings.screen_pii = args.screen_content, args.screen_pii
    settings.moderate_completions = args.moderate_completions
    for pair in args.base_model or []:
        name, sep, local = pair.partition("=")
        if not name:
            raise TuneryError(
                f"--base-model {pair!r}: write NAME or NAME=LOCAL, e.g. gpt-4o-mini=smollm2-135m-instruct"
            )
        settings.base_models[name] = local if sep else name
    # the address is tried before anything starts: a port in use would otherwise fail inside uvicorn,
    # after the banner, with its exit status 3 and no word of --port
    import errno
    import socket

    def bind_error(port: int) -> OSError | None:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET  # as uvicorn picks it
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                probe.bind((args.host, port))
            except OSError as exc:
                return exc
        return None

    address = f"http://[{args.host}]:{args.port}" if ":" in args.host else f"http://{args.host}:{args.port}"
    problem = bind_error(args.port)
    if problem is not None and problem.errno == errno.EADDRINUSE:
        free = next((p for p in range(args.port + 1, min(args.port + 100, 65536)) if not bind_error(p)), None)
        raise TuneryError(
            f"{address} is already in use (another `tunery serve`?); start on another port with "
            f"--port {free or 'PORT'}"
        )
    if problem is not None:
        hint = "ports below 1024 need root: use --port 8000" if problem.errno == errno.EACCES else ""
        raise TuneryError(
            f"cannot listen on {address}: {problem.strerror or problem}; {hint or 'check --host and --port'}"
        )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {args.host}: anyone who can reach it and holds a key can train and chat",
            file=sys.stderr,
        )
    if args.unconfined_python_graders:  # read by the sandbox here and in every worker the service starts
        os.environ[UNCONFINED_ENV] = "1"
    app = create_app(settings)  # before the banner: a damaged database stops here, with its message
    print(
        f"Tunery serving OpenAI's fine-tuning API on http://{args.host}:{args.port}/v1 and the web app on "
        f"http://{args.host}:{args.port}/ (data: {settings.data_dir})"
    )  # the app logs at start-up whether python graders run in the kernel sandbox
    serve(app, settings, log_level="debug" if args.verbose else "info", access_log=args.access_log)
    return 0


def serve_flags(p: argparse.ArgumentParser) -> None:
    service_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where jobs train: processes on this machine, or Ray jobs on a cluster (--ray-address)",
    )
    p.add_argument("--ray-address", metavar="URL", help="the Ray cluster's dashboard, e.g. http://HEAD:8265")
    p.add_argument(
        "--max-running-jobs",
        type=_count,
        help="training processes at once (default 1 locally; with Ray 0: as many as the cluster holds)",
    )
    p.add_argument("--job-cpus", type=_positive, default=1.0, help="CPUs a job asks of a Ray node")
    p.add_argument("--job-gpus", type=_non_negative, default=0.0, help="GPUs a job asks of a Ray node")
    p.add_argument(
        "--job-memory-gb", type=_non_negative, help="memory a job asks of a Ray node (default: by method)"
    )
    p.add_argument("--job-max-cpus", type=_positive, default=16.0, help="most CPUs a job may ask for")
    p.add_argument("--job-max-gpus", type=_non_negative, default=8.0, help="most GPUs a job may ask for")
    p.add_argument("--job-max-memory-gb", type=_positive, default=256.0, help="most memory a job may ask for")
    p.add_argument(
        "--project-running-jobs",
        type=_count,
        default=0,
        help="a project's training processes at once (0: any)",
    )
    p.add_argument(
        "--project-queued-jobs", type=_count, default=20, help="a project's waiting jobs; beyond, a 429"
    )
    p.add_argument(
        "--inference-replicas",
        type=_count,
        default=0,
        help="with --executor ray: inference replicas on the cluster instead of workers here",
    )
    p.add_argument(
        "--inference-workers",
        type=_at_least_one,
        default=1,
        help="worker processes answering chat completions",
    )
    p.add_argument(
        "--inference-cache",
        type=_at_least_one,
        default=Settings.inference_cache,
        help="models each inference worker keeps loaded (base models, and merged copies)",
    )
    p.add_argument(
        "--inference-adapters",
        type=_count,
        default=Settings.inference_adapters,
        help="adapters each worker keeps beside their base model (0: each merged into a copy of its own)",
    )
    p.add_argument("--max-upload-mb", type=int, default=512, help="largest file upload")
    p.add_argument("--stop-grace", type=float, default=30.0, help="seconds to checkpoint on cancel/stop")
    p.add_argument(
        "--header-seconds",
        type=_positive,
        default=Settings.header_seconds,
        help="a connection's request headers arrive within this many seconds, or it is closed",
    )
    p.add_argument("--base-model", action="append", metavar="NAME[=LOCAL]", help="offer another base model")
    p.add_argument("--train-set", action="append", metavar="KEY=VALUE", help="config field for every job")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--no-audit", action="store_true", help="keep no audit log (DATA_DIR/audit/)")
    p.add_argument("--audit-redact", action="store_true", help="redact personal data in the audit log")
    p.add_argument("--audit-fsync", action="store_true", help="sync each audit record to disk")
    p.add_argument("--screen-content", choices=POLICY_CHOICES, default="warn", help="jobs' offensive lines")
    p.add_argument("--screen-pii", choices=POLICY_CHOICES, default="block", help="jobs' personal data")
    p.add_argument(
        "--moderate-completions", action="store_true", help="withhold chat completions the classifier flags"
    )
    p.add_argument(
        "--unconfined-python-graders",
        action="store_true",
        help="run python graders without the bubblewrap sandbox where it cannot run (trusted graders only)",
    )


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, 0 or more")
    return value


def _at_least_one(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 or more")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give more than 0")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, 0 or more")
    return value


def cmd_keys_create(args: argparse.Namespace) -> int:
    from tunery.server.auth import create_key
    from tunery.server.store import Store

    store = Store(service_settings(args).database_url)
    try:
        if args.labeller:
            key_id, key = create_key(store, args.project, role="labeller", name=args.labeller)
        else:
            key_id, key = create_key(store, args.project)
    except ValueError as exc:
        raise TuneryError(str(exc)) from None
    _audit_key_change(args, args.project, "key.created", {"key_id": key_id, "labeller": args.labeller})
    print(key)
    who = f", labeller {args.labeller}" if args.labeller else ""
    print(f"({key_id}, project {args.project}{who}: shown once, stored hashed)", file=sys.stderr)
    return 0


def keys_create_flags(p: argparse.ArgumentParser) -> None:
    service_flags(p)
    p.add_argument("--project", required=True, help="project name (lowercase letters, digits, - and _)")
    p.add_argument(
        "--labeller", metavar="NAME", help="a labeller's key: labelling in the feedback studio only, as NAME"
    )


def cmd_keys_list(args: argparse.Namespace) -> int:
    from tunery.server.auth import list_keys
    from tunery.server.store import Store

    for key_id, project, prefix, _created, revoked, role, name in list_keys(
        Store(service_settings(args).database_url)
    ):
        who = f"labeller {name}" if role == "labeller" else role
        print(f"{key_id}  {project:<20} {prefix}...  {who}{'  revoked' if revoked else ''}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from tunery.server.auth import list_keys, revoke_key
    from tunery.server.store import Store

    store = Store(service_settings(args).database_url)
    project = next((row[1] for row in list_keys(store) if row[0] == args.key_id), None)
    if project is None or not revoke_key(store, args.key_id):
        raise TuneryError(f"no key {args.key_id}; `tunery keys list` shows them")
    _audit_key_change(args, project, "key.revoked", {"key_id": args.key_id})
    print(f"revoked {args.key_id}")
    return 0


def keys_revoke_flags(p: argparse.ArgumentParser) -> None:
    service_flags(p)
    p.add_argument("key_id")


def _audit_key_change(args: argparse.Namespace, project: str, kind: str, payload: dict[str, Any]) -> None:
    """Keys made or revoked on the command line go in the project's audit log, as the service's own
    changes do (the actor is whoever ran the command: the operator)."""
    from tunery.safety.audit import AuditLog

    payload = payload | {"via": "tunery keys", "user": _os_user()}
    AuditLog(service_settings(args).audit_dir).append(project, kind, payload, None)


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
