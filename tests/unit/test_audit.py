"""The audit log: every kind of tampering is caught and named by line, crashes are recovered without
breaking the chain, concurrent writers (threads and processes) keep one valid chain, redaction."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tunery.safety.audit import (
    GENESIS,
    HEAD_BEHIND,
    PARTIAL_LINE,
    AuditLog,
    _head_bytes,
    canonical,
    export,
    head_path,
    read_head,
    record_hash,
    verify,
)


def make_log(tmp_path: Path, n: int = 6, **kw: bool) -> tuple[AuditLog, Path]:
    log = AuditLog(tmp_path / "audit", **kw)
    for i in range(n):
        log.append("acme", "job.event", {"job_id": "ftjob-1", "message": f"event {i}"}, key_id="key_1")
    log.close()
    return log, log.path("acme")


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(new))


def rehash(record: dict, prev: str) -> bytes:
    """What someone who knows the format writes: a record with a correct hash for its content, laid out
    byte for byte as the writer does (canonical body, then the hash)."""
    body = canonical({k: v for k, v in record.items() if k != "hash"} | {"prev": prev})
    return body[:-1] + b',"hash":"' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'


def kinds(path: Path, **kw) -> list[tuple[int | None, str]]:
    return [(p.line, p.kind) for p in verify(path, **kw).problems]


def test_records_chain_and_hash_as_documented(tmp_path: Path) -> None:
    _, path = make_log(tmp_path, 3)
    records = [json.loads(line) for line in lines(path)]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev"] == GENESIS
    for before, record in zip(records, records[1:], strict=False):
        assert record["prev"] == before["hash"]
    body = {k: v for k, v in records[1].items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert records[1]["hash"] == hashlib.sha256(canonical).hexdigest()
    assert records[1]["actor"] == {"project": "acme", "key_id": "key_1"}
    assert read_head(path).seq == 3 and read_head(path).hash == records[-1]["hash"]
    result = verify(path)
    assert result.ok and result.records == 3 and (result.first_seq, result.last_seq) == (1, 3)


def test_a_duplicate_key_placed_first_is_caught(tmp_path: Path) -> None:
    """JSON readers disagree on duplicate keys: most keep the last, some the first. A line with a forged
    `actor` placed before the real one re-serialises to the real record, whose hash matches; only the
    exact bytes give it away."""
    _, path = make_log(tmp_path, 3)
    old = lines(path)
    forged = b'{"actor":{"key_id":"key_admin","project":"acme"},' + old[1][1:]
    parsed = json.loads(forged)
    assert parsed == json.loads(old[1]) and record_hash(parsed) == parsed["hash"]  # passed before
    old[1] = forged
    write_lines(path, old)
    assert kinds(path) == [(2, "edited")]
    # the same trick on the last line with the hash computed over the forged bytes and the head moved
    # to match: the bytes are not the canonical form of what they parse to
    _, path = make_log(tmp_path / "2", 2)
    old = lines(path)
    body = b'{"actor":{"key_id":"key_admin","project":"acme"},' + old[1][1 : old[1].index(b',"hash"')] + b"}"
    digest = hashlib.sha256(body).hexdigest()
    old[1] = body[:-1] + b',"hash":"' + digest.encode() + b'"}\n'
    write_lines(path, old)
    head = head_path(path)
    head.write_bytes(_head_bytes(2, digest, json.loads(old[1])["time"]))
    assert kinds(path) == [(2, "edited")]
    assert "duplicated key" in str(verify(path).first_problem)


def test_records_with_number_keys_verify(tmp_path: Path) -> None:
    """Keys are written as text and sorted as text, so a record reads back to the same bytes."""
    log = AuditLog(tmp_path / "audit")
    log.append("acme", "job.event", {"by_step": {10: 1.0, 9: 2.0}, "nan": float("nan")})
    log.close()
    assert verify(log.path("acme")).ok


def test_edited_field(tmp_path: Path) -> None:
    _, path = make_log(tmp_path)
    old = lines(path)
    old[2] = old[2].replace(b"event 2", b"event X")
    write_lines(path, old)
    assert kinds(path) == [(3, "edited")]
    assert "line 3 (seq 3): content edited" in str(verify(path).first_problem)


def test_edited_field_with_its_hash_recomputed_breaks_the_next_link(tmp_path: Path) -> None:
    _, path = make_log(tmp_path)
    old = lines(path)
    record = json.loads(old[2])
    record["payload"]["message"] = "forged"
    old[2] = rehash(record, record["prev"])
    write_lines(path, old)
    assert kinds(path) == [(4, "link")]


def test_deleted_middle_line(tmp_path: Path) -> None:
    _, path = make_log(tmp_path)
    old = lines(path)
    write_lines(path, old[:2] + old[3:])
    problems = verify(path).problems
    assert (problems[0].line, problems[0].kind) == (3, "sequence")
    assert "seq 2 then 4" in problems[0].message


def test_deleted_first_line(tmp_path: Path) -> None:
    _, path = make_log(tmp_path)
    write_lines(path, lines(path)[1:])
    assert kinds(path)[0] == (1, "sequence")


def test_deleted_last_lines_are_caught_by_the_head(tmp_path: Path) -> None:
    _, path = make_log(tmp_path)
    write_lines(path, lines(path)[:-2])
    result = verify(path)
    assert [p.kind for p in result.problems] == ["truncated"]
    assert "says seq 6 but the log ends at seq 4" in result.problems[0].message


def test_emptied_log_is_caught_by_the_head(tmp_path: Path) -> None:
    _, path = make_log(tmp_path)
    path.write_bytes(b"")
    assert [p.kind for p in verify(path).problems] == ["truncated"]


def test_swapped_lines(tmp_path: Path) -> None:
    _, path = make_log(tmp_path)
    old = lines(path)
    old[2], old[3] = old[3], old[2]
    write_lines(path, old)
    assert kinds(path)[:2] == [(3, "sequence"), (4, "sequence")]


def test_forged_line_inserted_with_a_recomputed_hash(tmp_path: Path) -> None:
    _, path = make_log(tmp_path)
    old = lines(path)
    before = json.loads(old[2])
    forged = json.loads(old[2]) | {"seq": 4, "payload": {"message": "forged"}}
    write_lines(path, old[:3] + [rehash(forged, before["hash"])] + old[3:])
    # the forged record itself is consistent; the original record after it is not
    assert kinds(path)[0] == (5, "sequence")


def test_forged_line_with_the_rest_of_the_chain_rewritten_is_caught_by_the_head(tmp_path: Path) -> None:
    _, path = make_log(tmp_path)
    records = [json.loads(line) for line in lines(path)]
    forged = records[:3] + [records[2] | {"payload": {"message": "forged"}}] + records[3:]
    out, prev = [], GENESIS
    for seq, record in enumerate(forged, start=1):
        out.append(rehash(record | {"seq": seq}, prev))
        prev = json.loads(out[-1])["hash"]
    write_lines(path, out)
    assert [p.kind for p in verify(path).problems] == ["head"]


def test_head_rewritten_too_is_caught_only_by_a_witness(tmp_path: Path) -> None:
    """The documented limit: whoever can write both files can cut the tail; a witnessed head cannot be."""
    log, path = make_log(tmp_path)
    witness = (read_head(path).seq, read_head(path).hash)
    kept = lines(path)[:-2]
    write_lines(path, kept)
    last = json.loads(kept[-1])
    head_path(path).write_bytes(_head_bytes(last["seq"], last["hash"], last["time"]))
    assert verify(path).ok
    result = verify(path, witness=witness)
    assert [p.kind for p in result.problems] == ["witness"]
    assert verify(path, witness=(4, last["hash"])).ok


def test_missing_or_garbled_head(tmp_path: Path) -> None:
    _, path = make_log(tmp_path)
    head = head_path(path).read_bytes()
    head_path(path).write_bytes(head.replace(b'"seq":6', b'"seq":9'))
    assert [p.kind for p in verify(path).problems] == ["head_garbled"]
    head_path(path).unlink()
    assert [p.kind for p in verify(path).problems] == ["head_missing"]


def test_not_json_line(tmp_path: Path) -> None:
    _, path = make_log(tmp_path)
    old = lines(path)
    old[1] = b"garbage\n"
    write_lines(path, old)
    assert kinds(path)[0] == (2, "not_json")


def test_partial_last_line_is_reported_then_moved_aside(tmp_path: Path) -> None:
    log, path = make_log(tmp_path, 3)
    partial = lines(path)[-1][:40]
    with path.open("ab") as fh:
        fh.write(partial)  # a writer killed mid-write
    result = verify(path)
    assert [(p.line, p.kind) for p in result.problems] == [(4, "partial_line")]
    assert "partial last line" in str(result.first_problem)

    log.append("acme", "job.event", {"message": "after the crash"})
    assert path.with_suffix(".partial").read_bytes() == partial + b"\n"
    records = [json.loads(line) for line in lines(path)]
    assert [r["type"] for r in records[3:]] == [PARTIAL_LINE, "job.event"]
    assert records[3]["payload"]["bytes"] == len(partial)
    result = verify(path)
    assert result.ok and result.records == 5
    assert any("partial line" in note for note in result.notes)


def test_crash_between_the_line_and_the_head(tmp_path: Path) -> None:
    log, path = make_log(tmp_path, 3)
    second = json.loads(lines(path)[1])
    head_path(path).write_bytes(_head_bytes(2, second["hash"], second["time"]))
    result = verify(path)
    assert result.ok and "one record behind" in result.notes[0]
    log.append("acme", "job.event", {"message": "next"})
    records = [json.loads(line) for line in lines(path)]
    assert records[3]["type"] == HEAD_BEHIND and records[3]["payload"]["seq"] == 3
    result = verify(path)
    assert result.ok and any("seq 3 was written without updating the head" in n for n in result.notes)


def test_a_cut_tail_found_by_the_writer_stays_in_the_chain(tmp_path: Path) -> None:
    log, path = make_log(tmp_path)
    write_lines(path, lines(path)[:-2])
    log.append("acme", "job.event", {"message": "service restarted"})
    result = verify(path)  # the head matches again, but the writer's record keeps the evidence
    assert [(p.line, p.kind) for p in result.problems] == [(5, "writer_found")]
    assert "records were removed" in result.problems[0].message


def test_threads_keep_one_chain(tmp_path: Path) -> None:
    first, second = AuditLog(tmp_path / "audit"), AuditLog(tmp_path / "audit")  # two open files, one log

    def work(log: AuditLog, i: int) -> None:
        for j in range(100):
            log.append("acme", "inference.request", {"thread": i, "j": j})

    threads = [threading.Thread(target=work, args=(first if i % 2 else second, i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = verify(first.path("acme"))
    assert result.ok and result.records == 800 and result.last_seq == 800


WRITER = """
import sys
from pathlib import Path
from tunery.safety.audit import AuditLog
log = AuditLog(Path(sys.argv[1]))
for j in range(300):
    log.append("acme", "inference.request", {"process": sys.argv[2], "j": j})
"""


def test_processes_keep_one_chain(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "audit"), str(i)]) for i in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    path = tmp_path / "audit" / "acme.jsonl"
    result = verify(path)
    assert result.ok and result.records == 600
    writers = {json.loads(line)["payload"]["process"] for line in lines(path)}
    assert writers == {"0", "1"}


def test_redaction(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit", redact=True)
    text = "Mail jane.doe@gmail.com or call 415-867-5309 about order 12345"
    record = log.append(
        "acme",
        "inference.request",
        {"completion_id": "chatcmpl-4158675309", "messages": [{"role": "user", "content": text}]},
    )
    content = record["payload"]["messages"][0]["content"]
    assert "jane.doe@gmail.com" not in content and "867-5309" not in content
    assert "[EMAIL]" in content and "[PHONE]" in content and "order 12345" in content
    assert record["payload"]["completion_id"] == "chatcmpl-4158675309"  # an id is never redacted
    assert record["redacted"] is True
    raw = log.path("acme").read_text()
    assert "jane.doe" not in raw and "5309 about" not in raw
    assert verify(log.path("acme")).ok


def test_non_finite_numbers_and_odd_values(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    record = log.append("acme", "job.event", {"data": {"loss": float("nan"), "steps": (1, 2)}, "s": "\ud800"})
    assert record["payload"]["data"] == {"loss": "nan", "steps": [1, 2]}
    assert verify(log.path("acme")).ok


def test_project_names_are_file_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="project name"):
        AuditLog(tmp_path).path("../etc")


def test_export_jsonl_with_filters_and_manifest(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    for kind in ("inference.request", "inference.response", "job.status", "file.uploaded"):
        log.append("acme", kind, {"kind": kind})
    out = tmp_path / "out" / "acme.jsonl"
    manifest = export(log.path("acme"), out, types=["inference", "file.uploaded"])
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["type"] for r in exported] == ["inference.request", "inference.response", "file.uploaded"]
    assert all(record_hash(r) == r["hash"] for r in exported)
    assert manifest["records"] == 3 and (manifest["first_seq"], manifest["last_seq"]) == (1, 4)
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert manifest["verification"]["ok"] and manifest["head"]["seq"] == 4
    assert json.loads(Path(f"{out}.manifest.json").read_text()) == manifest
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left

    time = exported[1]["time"]
    assert export(log.path("acme"), out, since=time)["records"] == 3
    assert export(log.path("acme"), out, until=time)["records"] == 1
    assert export(log.path("acme"), out, since="2000-01-01", until="2000-01-02")["records"] == 0
    with pytest.raises(ValueError, match="ISO 8601"):
        export(log.path("acme"), out, since="yesterday")


def test_export_csv_and_a_failed_verification(tmp_path: Path) -> None:
    _, path = make_log(tmp_path, 3)
    write_lines(path, lines(path)[:-1])
    out = tmp_path / "acme.csv"
    manifest = export(path, out, format="csv")
    rows = list(csv.DictReader(out.open()))
    assert [r["seq"] for r in rows] == ["1", "2"] and rows[0]["key_id"] == "key_1"
    assert json.loads(rows[0]["payload"]) == {"job_id": "ftjob-1", "message": "event 0"}
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert not manifest["verification"]["ok"] and "truncated" in manifest["verification"]["problems"][0]
