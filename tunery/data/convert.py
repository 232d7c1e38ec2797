"""`tunery data convert`: training data in a common foreign format (data/formats.py) to OpenAI chat JSONL.

    tunery data convert qa.csv qa.jsonl                  # columns named question/answer, prompt/completion...
    tunery data convert data.tsv data.jsonl --columns user=q,assistant=a,system=persona
    tunery data convert legacy.jsonl chat.jsonl --system "You are a support agent."
    tunery data convert qa.jsonl chat.jsonl --from jsonl --columns user=q,assistant=a   # flat objects

A JSON array of objects already in an OpenAI format (chat, preference pairs, ratings) is written one
object per line, unchanged.

Texts lose trailing whitespace and nothing else: legacy prompt/completion data often ends prompts with a
separator ("\\n\\n###\\n\\n") and completions with a stop word (" END"); they are kept, and reported when
every line shares one, because only the author knows whether they belong to the text. Every line written
passes the chat check (data/chat.py); the lines that would not are skipped and reported with the reason.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunery.data.chat import check_chat_example
from tunery.data.formats import guess_columns, is_openai, line_format, sniff_format
from tunery.data.jsonl import MAX_FILE_BYTES, MAX_LINE_BYTES, check_readable, read_jsonl
from tunery.errors import TuneryError
from tunery.training.io import atomic_write_text

SOURCES = ("auto", "prompt-completion", "sharegpt", "alpaca", "csv", "tsv", "json-array", "jsonl")
ROLES = ("user", "assistant", "system")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
Columns = dict[str, list[str]]  # role -> the columns (or keys) whose texts make its turn, joined


@dataclass
class Conversion:
    path: str
    out: str
    source: str  # the file's format
    rows: list[dict[str, Any]] = field(default_factory=list)  # the lines to write
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, why)
    notes: list[str] = field(default_factory=list)
    mapping: str = ""  # "user=question, assistant=answer" for tables


def parse_columns(text: str | None) -> Columns | None:
    """`user=question,assistant=answer[,system=COL]`; `COL+COL` joins columns with a blank line."""
    if not text:
        return None
    columns: Columns = {}
    for part in text.split(","):
        role, sep, names = part.partition("=")
        role = role.strip()
        if not sep or role not in ROLES or not names.strip():
            raise TuneryError(
                f"--columns {text!r}: write it as user=COL,assistant=COL (system=COL optional; "
                "COL+COL joins two columns)"
            )
        columns[role] = [n.strip() for n in names.split("+")]
    if "user" not in columns or "assistant" not in columns:
        raise TuneryError(f"--columns {text!r}: name both the user= and the assistant= column")
    return columns


# --- turns ------------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.rstrip()
    if isinstance(value, bool | int | float):
        return str(value)
    raise ValueError(f"holds a {type(value).__name__}, not text")


def _turns(value: Any, role: str, name: str) -> list[dict[str, Any]]:
    """A string is one turn of `role`; a list of {role, content} messages is kept as it is."""
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return [dict(m) for m in value]
    if isinstance(value, list):
        raise ValueError(f"'{name}' is a list but not of {{role, content}} messages")
    text = _text(value)
    if not text:
        raise ValueError(f"'{name}' is missing or empty")
    return [{"role": role, "content": text}]


def _from_record(record: dict[str, Any], columns: Columns) -> list[dict[str, Any]]:
    messages = []
    for role in ("system", "user", "assistant"):
        texts = []
        for name in columns.get(role, []):
            try:
                texts.append(_text(record.get(name)))
            except ValueError as exc:
                raise ValueError(f"'{name}' {exc}") from None
        text = "\n\n".join(t for t in texts if t)
        if text:
            messages.append({"role": role, "content": text})
        elif role != "system":
            raise ValueError(
                f"{' + '.join(repr(n) for n in columns[role])} is missing or empty (the {role} turn)"
            )
    return messages


def _from_prompt_completion(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return _turns(obj.get("prompt"), "user", "prompt") + _turns(
        obj.get("completion"), "assistant", "completion"
    )


def _from_alpaca(obj: dict[str, Any]) -> list[dict[str, Any]]:
    messages = []
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        messages.append({"role": "system", "content": obj["system"].rstrip()})
    for pair in obj.get("history") or []:  # LLaMA-Factory's earlier turns: [[question, answer], ...]
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError("'history' must be a list of [question, answer] pairs")
        messages += [
            {"role": "user", "content": _text(pair[0])},
            {"role": "assistant", "content": _text(pair[1])},
        ]
    return messages + _from_record(obj, {"user": ["instruction", "input"], "assistant": ["output"]})


def _from_sharegpt(obj: dict[str, Any]) -> list[dict[str, Any]]:
    messages = []
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        messages.append({"role": "system", "content": obj["system"].rstrip()})
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list of turns")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"conversations[{i}] is not an object")
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise ValueError(
                f"conversations[{i}] is from {speaker!r}; only human, gpt and system turns convert to chat"
            )
        text = _text(turn.get("value", turn.get("content")))
        if not text:
            raise ValueError(f"conversations[{i}] has an empty 'value'")
        messages.append({"role": role, "content": text})
    return messages


# --- reading ----------------------------------------------------------------------------------------------


def _jsonl_objects(path: Path, max_bytes: int) -> Iterator[tuple[int, Any, str | None]]:
    for line in read_jsonl(path, max_bytes):
        yield line.number, line.value, line.error


def _read_text(path: Path, max_bytes: int) -> str:
    check_readable(path, max_bytes)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TuneryError(
            f"{path}, line {line}: not valid UTF-8 (byte {exc.start}); save it as UTF-8"
        ) from None


def _table_rows(
    path: Path, delimiter: str, max_bytes: int
) -> tuple[list[str], Iterator[tuple[int, Any, str | None]]]:
    """The header and, per data row, (first line, {column: cell} or None, why it is unusable)."""
    text = _read_text(path, max_bytes)
    old_limit = csv.field_size_limit(MAX_LINE_BYTES)
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        parsed: list[tuple[int, list[str]]] = []
        start = 1
        for row in reader:
            if row:
                parsed.append((start, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise TuneryError(f"{path}, line {reader.line_num}: {exc}; check the quoting") from None
    finally:
        csv.field_size_limit(old_limit)
    if not parsed:
        raise TuneryError(f"{path}: no rows")
    header = [c.strip() for c in parsed[0][1]]

    def rows() -> Iterator[tuple[int, Any, str | None]]:
        for number, row in parsed[1:]:
            if len(row) != len(header):
                yield number, None, f"has {len(row)} fields; the header has {len(header)}"
            else:
                yield number, dict(zip(header, row, strict=True)), None

    return header, rows()


_WS = re.compile(r"[ \t\n\r]*")


def _skip(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    return match.end() if match else pos


def _array_items(path: Path, max_bytes: int) -> Iterator[tuple[int, Any, str | None]]:
    """The elements of a whole-file JSON array, each with the line it starts on."""
    text = _read_text(path, max_bytes)
    decoder = json.JSONDecoder()
    pos, line, counted = _skip(text, 0), 1, 0

    def fail(message: str) -> TuneryError:
        return TuneryError(f"{path}, line {text.count(chr(10), 0, pos) + 1}: {message}")

    if text[pos : pos + 1] != "[":
        raise fail("expected a JSON array, starting with '['")
    pos = _skip(text, pos + 1)
    if text[pos : pos + 1] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise TuneryError(
                f"{path}, line {exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}"
            ) from None
        yield line, value, None
        pos = _skip(text, pos)
        if text[pos : pos + 1] == ",":
            pos = _skip(text, pos + 1)
        elif text[pos : pos + 1] == "]":
            break
        else:
            raise fail("expected ',' or ']' after an array element")
    if _skip(text, pos + 1) != len(text):
        raise fail("text after the end of the JSON array")


# --- the conversion ---------------------------------------------------------------------------------------


def convert_data(
    path: str | Path,
    out: str | Path,
    source: str = "auto",
    system: str | None = None,
    columns: Columns | None = None,
    overwrite: bool = False,
    max_bytes: int = MAX_FILE_BYTES,
) -> Conversion:
    """Convert `path` to OpenAI chat JSONL at `out`, written atomically; returns what was converted and
    skipped. Refuses (TuneryError) before reading when `out` exists, unless `overwrite`."""
    path, out = Path(path), Path(out)
    if out.is_dir():
        raise TuneryError(f"{out}: is a directory; give a file name such as data.jsonl")
    if out.exists() and out.resolve() == path.resolve():
        raise TuneryError(f"{out}: is the input file; write the converted data to another file")
    if out.exists() and not overwrite:
        raise TuneryError(f"{out} exists; pass --overwrite to replace it")
    conversion = read_conversion(path, source, system, columns, max_bytes)
    conversion.out = str(out)
    if not conversion.rows:
        shown = "; ".join(f"line {n}: {why}" for n, why in conversion.skipped[:3])
        raise TuneryError(f"{path}: no example could be converted ({shown}); nothing written")
    atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in conversion.rows))
    return conversion


def read_conversion(
    path: str | Path,
    source: str = "auto",
    system: str | None = None,
    columns: Columns | None = None,
    max_bytes: int = MAX_FILE_BYTES,
) -> Conversion:
    """The examples of `path` in OpenAI chat format, and the lines skipped and why (nothing written)."""
    path = Path(path)
    if source not in SOURCES:
        raise TuneryError(f"--from {source}: use one of {', '.join(SOURCES)}")
    fmt = _detect(path, columns, max_bytes) if source == "auto" else source
    conversion = Conversion(str(path), "", fmt)
    items: Iterator[tuple[int, Any, str | None]]
    if fmt in ("csv", "tsv"):
        names, items = _table_rows(path, "," if fmt == "csv" else "\t", max_bytes)
        kind = "records"
    else:
        listed = list(
            _array_items(path, max_bytes) if fmt == "json-array" else _jsonl_objects(path, max_bytes)
        )
        first = next((v for _, v, _ in listed if isinstance(v, dict)), None)
        if first is None:
            raise TuneryError(f"{path}: holds no JSON objects to convert")
        names, items = list(first), iter(listed)
        if fmt in ("prompt-completion", "sharegpt", "alpaca"):
            kind = fmt
        else:
            kind = "openai" if is_openai(first) else line_format(first) or "records"
    if columns is not None and kind in ("prompt-completion", "alpaca"):
        kind = "records"  # --columns names the keys to read
    if kind == "records":
        columns = _columns(path, names, columns, conversion)
    elif columns is not None:
        raise TuneryError(f"{path}: --columns applies to tables and flat objects, not to {kind} data")

    prompts: list[str] = []
    completions: list[str] = []
    for number, value, error in items:
        if error is not None:
            conversion.skipped.append((number, error))
            continue
        if not isinstance(value, dict):
            conversion.skipped.append((number, f"not a JSON object but {type(value).__name__}"))
            continue
        if kind == "openai":
            conversion.rows.append(value)  # already a format Tunery reads: one per line, unchanged
            continue
        try:
            if kind == "records":
                assert columns is not None
                messages = _from_record(value, columns)
            elif kind == "prompt-completion":
                messages = _from_prompt_completion(value)
            elif kind == "alpaca":
                messages = _from_alpaca(value)
            else:
                messages = _from_sharegpt(value)
        except ValueError as exc:
            conversion.skipped.append((number, str(exc)))
            continue
        if system and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": system})
        example, problems = check_chat_example({"messages": messages}, number)
        if example is None:
            error_found = next(p for p in problems if p.severity == "error")
            conversion.skipped.append((number, f"{error_found.message} [{error_found.key}]"))
            continue
        conversion.rows.append({"messages": messages})
        if (
            kind == "prompt-completion"
            and isinstance(value.get("prompt"), str)
            and isinstance(value.get("completion"), str)
        ):
            prompts.append(messages[-2]["content"])
            completions.append(messages[-1]["content"])
    for what, texts in (("prompt", prompts), ("completion", completions)):
        ending = _shared_ending(texts)
        if ending:
            conversion.notes.append(
                f"every {what} ends with {ending!r}, kept as text: if it is a legacy separator or stop "
                f"sequence, remove it from the {what}s (a chat template marks where turns end)"
            )
    return conversion


def _detect(path: Path, columns: Columns | None, max_bytes: int) -> str:
    """The format of a file for --from auto, or a TuneryError saying which option to give."""
    found = sniff_format(path, max_bytes)
    if found is not None and found.format == "text":
        raise TuneryError(
            f"{path}: this looks like {found.looks_like}. Plain text has no user and assistant turns to "
            "convert: save it as a CSV with a header row (e.g. question,answer) and convert that"
        )
    if found is not None:
        return found.format
    for number, value, _ in _jsonl_objects(path, max_bytes):
        if not isinstance(value, dict):
            continue
        if is_openai(value):
            raise TuneryError(
                f"{path}, line {number}: already in an OpenAI format Tunery reads; nothing to convert "
                f"(check it with `tunery data validate {path}`)"
            )
        if columns is not None or guess_columns(list(value)) is not None:
            return "jsonl"  # one flat object per line, read like a table
        raise TuneryError(
            f"{path}, line {number}: cannot tell which keys hold the user's and the assistant's turns "
            f"(keys: {', '.join(value) or 'none'}); name them: --columns user=KEY,assistant=KEY"
        )
    raise TuneryError(f"{path}: cannot tell the format; give --from ({'|'.join(SOURCES[1:])})")


def _columns(path: Path, names: list[str], columns: Columns | None, conversion: Conversion) -> Columns:
    """The columns to read: as given (each must exist), or guessed from the names (or refused)."""
    if columns is None:
        columns = guess_columns(names)
        if columns is None:
            raise TuneryError(
                f"{path}: cannot tell which columns hold the user's and the assistant's turns (columns: "
                f"{', '.join(names) or 'none'}); name them: --columns user=COL,assistant=COL "
                "(system=COL optional, COL+COL joins two)"
            )
    missing = [n for chosen in columns.values() for n in chosen if n not in names]
    if missing:
        raise TuneryError(f"{path}: no column {missing[0]!r}; the columns are: {', '.join(names)}")
    used = {n for chosen in columns.values() for n in chosen}
    conversion.mapping = ", ".join(f"{role}={'+'.join(chosen)}" for role, chosen in columns.items() if chosen)
    ignored = [n for n in names if n and n not in used]
    if ignored:
        conversion.notes.append(f"not converted: {', '.join(ignored)}")
    return columns


def _shared_ending(texts: list[str]) -> str:
    """The ending every text shares, when it looks like a marker (two or more non-space characters)."""
    if len(texts) < 3:
        return ""
    common = os.path.commonprefix([t[::-1] for t in texts])[::-1]
    space = next((i for i, c in enumerate(common) if c.isspace()), 0)
    if len(common[space:].strip()) >= 2:
        common = common[space:]  # "?\n\n###" -> "\n\n###": the marker, not what ends every question
    return common if len(common.strip()) >= 2 else ""


def format_conversion(conversion: Conversion, max_skipped: int = 20) -> str:
    total = len(conversion.rows) + len(conversion.skipped)
    lines = [
        f"converted {len(conversion.rows)} of {total} examples in {conversion.path} "
        f"({conversion.source}{', ' + conversion.mapping if conversion.mapping else ''}) to {conversion.out}"
    ]
    for number, why in conversion.skipped[:max_skipped]:
        lines.append(f"  skipped line {number}: {why}")
    if len(conversion.skipped) > max_skipped:
        lines.append(f"  ... and {len(conversion.skipped) - max_skipped} more skipped")
    lines += [f"  note: {note}" for note in conversion.notes]
    lines.append(f"check it: tunery data validate {conversion.out}")
    return "\n".join(lines)
