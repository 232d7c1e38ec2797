"""Data validation: every OpenAI error key, broken files, token statistics, the CLI's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import chat_lines, write_jsonl
from tunery.cli import main
from tunery.data.validate import validate_chat_file
from tunery.errors import TuneryError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def keys_by_line(report) -> dict[int | None, set[str]]:
    out: dict[int | None, set[str]] = {}
    for p in report.problems:
        out.setdefault(p.line, set()).add(p.key)
    return out


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("[1, 2]", "data_type"),
        ('{"messages": []}', "missing_messages_list"),
        ('{"prompt": "x", "completion": "y"}', "missing_messages_list"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}', "message_missing_key"),
        (
            '{"messages": [{"role": "user", "content": "q", "mood": 1}, {"role": "assistant", "content": "a"}]}',
            "message_unrecognized_key",
        ),
        (
            '{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
            "unrecognized_role",
        ),
        (
            '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
            "missing_content",
        ),
        (
            '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}',
            "missing_content",
        ),
        ('{"messages": [{"role": "user", "content": "q"}]}', "example_missing_assistant_message"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}',
            "invalid_weight",
        ),
        (
            '{"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}',
            "invalid_weight",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}',
            "no_trained_assistant_message",
        ),
        (
            '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, '
            '{"role": "assistant", "content": "a"}]}',
            "unsupported_content",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": [1]}',
            "invalid_tools",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}',
            "invalid_json",
        ),
    ],
)
def test_each_error_key_is_reported_with_its_line(tmp_path: Path, line: str, key: str) -> None:
    lines = [json.dumps(GOOD)] * 3 + [line] + [json.dumps(x) for x in chat_lines(10)]
    report = validate_chat_file(write_jsonl(tmp_path / "d.jsonl", lines))
    assert key in keys_by_line(report).get(4, set()), report.problems
    assert all(p.line == 4 for p in report.errors)


def test_valid_file_has_no_errors_and_exact_token_stats(tmp_path: Path, tiny) -> None:
    _, tokenizer = tiny
    report = validate_chat_file(write_jsonl(tmp_path / "d.jsonl", chat_lines(12)), tokenizer, max_length=1024)
    assert not report.errors
    assert report.stats["examples"] == 12
    lengths = sorted(len(c.input_ids) for c in report.chats)
    assert report.stats["tokens_per_example"]["min"] == lengths[0]
    assert report.stats["tokens_per_example"]["max"] == lengths[-1]
    assert report.stats["total_tokens"] == sum(lengths)
    assert report.stats["auto_epochs"] == 8  # 100 // 12 per OpenAI's heuristic


def test_warnings_duplicates_overlength_and_minimum(tmp_path: Path, tiny) -> None:
    _, tokenizer = tiny
    lines = chat_lines(5) + [chat_lines(1)[0]]
    report = validate_chat_file(write_jsonl(tmp_path / "d.jsonl", lines), tokenizer, max_length=40)
    by_key = {p.key: p for p in report.problems}
    assert by_key["duplicate_example"].line == 6 and "line 1" in by_key["duplicate_example"].message
    assert by_key["too_many_tokens"].severity == "warning"
    assert (
        by_key["invalid_n_examples"].severity == "error"
        and "at least 10" in by_key["invalid_n_examples"].message
    )


def test_tool_calls_and_tool_role_are_accepted(tmp_path: Path) -> None:
    from tests.unit.test_tools import CHAT as example  # a call, its result, the answer from it

    report = validate_chat_file(write_jsonl(tmp_path / "d.jsonl", [example] * 1 + chat_lines(10)))
    assert not report.errors, report.errors


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\x00\x01\x02binary", "binary"),
        (b"\x1f\x8b\x08\x00gzip", "compressed"),
    ],
)
def test_broken_files_get_clear_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(TuneryError, match=message):
        validate_chat_file(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(TuneryError, match="no such file"):
        validate_chat_file(tmp_path / "nope.jsonl")
    with pytest.raises(TuneryError, match="directory"):
        validate_chat_file(tmp_path)


def test_invalid_utf8_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff\xfe"}\n')
    report = validate_chat_file(path)
    assert [(p.line, p.key) for p in report.errors] == [(2, "invalid_json")]
    assert "UTF-8" in report.errors[0].message


def test_100_mb_file_gets_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("wb") as fh:  # one 100 MB line, as from a file missing its newlines
        fh.write(b'{"messages": "' + b"x" * (100 * 2**20) + b'"}')
    report = validate_chat_file(path)
    assert report.errors and "16 MB per-line limit" in report.errors[0].message
    assert main(["data", "validate", str(path), "--model", "none", "--max-bytes", str(50 * 2**20)]) == 2
    assert "over the 50 MB limit" in capsys.readouterr().err


def test_cli_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", chat_lines(12))
    assert main(["data", "validate", str(good), "--model", "tiny-random"]) == 0
    assert "12 valid examples, 0 errors" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(x) for x in chat_lines(12)] + ["not json"])
    assert main(["data", "validate", str(bad), "--model", "tiny-random", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["problems"][0] == {
        "line": 13,
        "key": "invalid_json",
        "severity": "error",
        "message": report["problems"][0]["message"],
    }


WEIRD = [None, True, 0, 2, -1.5, "", "yes", [], [1], {}, {"a": 1}, "\x00", "é" * 3]


def _mutations(obj, path=()):
    """Every (path, value) pair that replaces one node of `obj` with a weird value."""
    yield from ((path, w) for w in WEIRD)
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, child in children:
        yield from _mutations(child, (*path, key))


def _replace(obj, path, value):
    if not path:
        return value
    copy = dict(obj) if isinstance(obj, dict) else list(obj)
    copy[path[0]] = _replace(obj[path[0]], path[1:], value)
    return copy


def test_no_malformed_example_crashes_validation(tmp_path: Path, tiny) -> None:
    """Any single field replaced by a value of the wrong type or shape is reported, never raised."""
    _, tokenizer = tiny
    base = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "weight": 1},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }
    lines = [json.dumps(_replace(base, path, value)) for path, value in _mutations(base)]
    assert len(lines) > 200
    report = validate_chat_file(write_jsonl(tmp_path / "d.jsonl", lines), tokenizer, max_length=64)
    assert report.errors  # plenty of them, each with a line number
    assert all(p.line is not None for p in report.errors if p.key != "invalid_n_examples")


def test_a_lone_surrogate_escape_is_named_by_its_line_and_an_emoji_pair_is_fine(tmp_path: Path) -> None:
    from tunery.data.jsonl import read_jsonl

    path = tmp_path / "chat.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}, {"role": "assistant", "content": "ok"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cut \\ud83d here"}]}\n'
    )
    first, second = read_jsonl(path)
    assert first.error is None and first.value["messages"][0]["content"] == "hi \U0001f600"
    assert (
        second.value is None
        and second.error is not None
        and "\\ud83d is half of a UTF-16 pair" in second.error
    )
