"""`tunery audit verify | export | head`: the service's tamper-evident audit log, read for an auditor."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunery.errors import TuneryError


def audit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project", help="the project whose log to read")
    p.add_argument("--data-dir", help="the service's data directory (default $TUNERY_HOME/service)")


def _audit_logs(args: argparse.Namespace) -> list[Path]:
    """The audit logs a `tunery audit` command names: --project's, or with --all every project's."""
    from tunery.safety.audit import AuditLog, logs
    from tunery.server.settings import Settings

    directory = Settings.from_env(data_dir=Path(args.data_dir) if args.data_dir else None).audit_dir
    if getattr(args, "all", False):
        paths = logs(directory)
        if not paths:
            raise TuneryError(f"no audit logs in {directory} (is --data-dir the one `tunery serve` uses?)")
        return paths
    if not args.project:
        raise TuneryError("name a project with --project P, or check every log with --all")
    try:
        path = AuditLog(directory).path(args.project)
    except ValueError as exc:
        raise TuneryError(str(exc)) from None
    if not path.is_file():
        known = ", ".join(p.stem for p in logs(directory)) or "none"
        raise TuneryError(
            f"no audit log for project {args.project!r} at {path} (projects with logs: {known})"
        )
    return [path]


def cmd_verify(args: argparse.Namespace) -> int:
    from tunery.safety.audit import verify

    witness = None
    if args.witness:
        seq, _, digest = args.witness.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise TuneryError(
                f"--witness {args.witness!r}: write SEQ:HASH as `tunery audit head` printed them"
            )
        witness = (int(seq), digest)
    intact = True
    for path in _audit_logs(args):
        result = verify(path, witness)
        intact = intact and result.ok
        span = f"seq {result.first_seq}-{result.last_seq}" if result.records else "empty"
        if result.ok:
            print(f"{path.stem}: intact, {result.records} records ({span}), last hash {result.last_hash}")
        else:
            print(
                f"{path.stem}: NOT INTACT, {result.problem_count} problem(s) in {path} ({result.records} records)"
            )
            for problem in result.problems:
                print(f"  {problem}")
        for note in result.notes:
            print(f"  note: {note}")
    return 0 if intact else 1


def verify_flags(p: argparse.ArgumentParser) -> None:
    audit_flags(p)
    p.add_argument("--all", action="store_true", help="every project's log")
    p.add_argument("--witness", metavar="SEQ:HASH", help="a head recorded earlier by `tunery audit head`")


def cmd_export(args: argparse.Namespace) -> int:
    from tunery.safety.audit import export

    (path,) = _audit_logs(args)
    try:
        manifest = export(path, Path(args.out), args.since, args.until, args.type or (), args.format)
    except ValueError as exc:
        raise TuneryError(f"audit export: {exc}") from None
    span = f"seq {manifest['first_seq']}-{manifest['last_seq']}" if manifest["records"] else "no records"
    print(f"wrote {manifest['records']} records ({span}) to {args.out}, sha256 {manifest['sha256']}")
    print(f"manifest: {args.out}.manifest.json")
    verification = manifest["verification"]
    if not verification["ok"]:
        print(f"warning: the log failed verification: {verification['problems'][0]}", file=sys.stderr)
    return 0


def export_flags(p: argparse.ArgumentParser) -> None:
    audit_flags(p)
    p.add_argument("--since", metavar="ISO", help="from this time (UTC unless it says otherwise)")
    p.add_argument("--until", metavar="ISO", help="before this time")
    p.add_argument("--type", action="append", metavar="T", help="record type, e.g. inference or job.status")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--out", required=True)


def cmd_head(args: argparse.Namespace) -> int:
    from tunery.safety.audit import read_head

    (path,) = _audit_logs(args)
    try:
        head = read_head(path)
    except ValueError as exc:
        raise TuneryError(str(exc)) from None
    if head is None:
        raise TuneryError(f"{path}: no head file; `tunery audit verify --project {args.project}` says why")
    print(json.dumps({"project": args.project, "seq": head.seq, "hash": head.hash, "time": head.time}))
    print(
        f"keep this where the service cannot write it; later: tunery audit verify --project {args.project} "
        f"--witness {head.seq}:{head.hash}",
        file=sys.stderr,
    )
    return 0
