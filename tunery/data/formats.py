"""Recognise training data in a format Tunery does not read, so the error says what the file is and how
to convert it, instead of a JSON parse error on line 1.

    prompt-completion  OpenAI's legacy {"prompt": "...", "completion": "..."} lines (no "label": with one,
                       a line is a KTO rating, data/feedback.py)
    sharegpt           {"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}, ...]}
    alpaca             {"instruction": "...", "input": "...", "output": "..."}
    csv, tsv           a table with a header row
    json-array         the whole file is one JSON array [{...}, {...}], often pretty-printed
    text               none of these: plain text

Only the head of the file is read (64 KB), so a check costs the same for any file size. Imports the
standard library only: the service uses it on uploads.
"""

from __future__ import annotations

import csv
import io
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.data.chat import Problem
from tunery.data.jsonl import MAX_FILE_BYTES, check_readable
from tunery.errors import TuneryError

FOREIGN = ("prompt-completion", "sharegpt", "alpaca", "csv", "tsv", "json-array", "text")
PROBLEM_KEY = "foreign_format"  # the Problem key of a file in a foreign format (the service looks for it)
HEAD_BYTES = 64 * 1024
SAMPLE_LINES = 20

# Column (or key) names that say which turn a column holds. Compared lower-cased, spaces as underscores.
USER_NAMES = ("user", "prompt", "question", "input", "instruction", "query", "human", "request", "q")
ASSISTANT_NAMES = ("assistant", "completion", "answer", "output", "response", "reply", "gpt", "target", "a")
SYSTEM_NAMES = ("system", "system_prompt", "system_message")

# What each method reads, by the `expect` of a check (None: `tunery data validate` with no --format).
EXPECTED = {
    "chat": 'Tunery expects OpenAI chat JSONL for SFT: one {"messages": [{"role": "user", ...}, '
    '{"role": "assistant", ...}]} per line',
    "preference": 'DPO and reward models read OpenAI preference JSONL: one {"input": {"messages": [...]}, '
    '"preferred_output": [...], "non_preferred_output": [...]} per line',
    "unpaired": 'KTO reads ratings: one {"prompt": ..., "completion": ..., "label": true|false} per line',
    "prompts": 'Reinforcement fine-tuning reads prompts: one {"messages": [...]} per line, ending with a '
    "user turn",
}


@dataclass(frozen=True)
class Foreign:
    """A file in a format Tunery does not train on, and what `tunery data convert` can make of it."""

    path: str  # as the user named it: the convert command repeats it
    format: str  # one of FOREIGN
    line: int  # where it shows (the header of a table, the opening bracket of an array)
    looks_like: str  # "a CSV file with columns question, answer"
    convertible: bool  # `tunery data convert` knows what to do without being told
    needs_columns: bool = False  # a table whose user/assistant columns must be named with --columns
    target: str = "chat"  # the kind `tunery data convert` writes (a JSON array of DPO pairs stays DPO)
    items: str | None = None  # json-array: its elements' format (a FOREIGN line format, "openai", "records")

    def message(self, expect: str | None = None) -> str:
        """What the file looks like, what Tunery expects, and how to convert it: one line."""
        parts = [f"this looks like {self.looks_like}", EXPECTED.get(expect or "chat", EXPECTED["chat"])]
        command = f"tunery data convert {shlex.quote(self.path)} {shlex.quote(converted_name(self.path))}"
        prompts = expect == "prompts" and self.items == "openai" and self.target == "chat"
        if expect in (None, self.target) or prompts:
            if self.needs_columns:
                parts.append(f"Convert it, naming the columns: {command} --columns user=COL,assistant=COL")
            elif self.convertible:
                parts.append(f"Convert it: {command}")
        if self.format == "prompt-completion" and expect in (None, "unpaired"):
            label = 'add "label": true (thumbs up) or false (thumbs down) to every line'
            parts.append(f"To use it as KTO ratings, {label}" if expect is None else "A" + label[1:])
        if self.format == "text" and expect in (None, "chat"):
            parts.append(
                "`tunery data convert` reads CSV, TSV, JSON arrays, ShareGPT, Alpaca and prompt/completion "
                "files; plain text has no turns to convert"
            )
        return ". ".join(parts)

    def problem(self, expect: str | None = None) -> Problem:
        return Problem(self.line, PROBLEM_KEY, self.message(expect))


def converted_name(path: str) -> str:
    """The OUT suggested for IN: data.csv -> data.jsonl, train.jsonl -> train.chat.jsonl."""
    p = Path(path)
    name = f"{p.stem}.chat.jsonl" if p.suffix == ".jsonl" else f"{p.stem}.jsonl"
    return name if str(p.parent) == "." else str(p.parent / name)


def foreign_problem(path: str | Path, expect: str | None, max_bytes: int = MAX_FILE_BYTES) -> Problem | None:
    """The one problem to report for a file in a foreign format, else None (read it line by line)."""
    found = sniff_format(path, max_bytes)
    return None if found is None else found.problem(expect)


def raise_foreign(path: str | Path, problems: list[Problem]) -> None:
    """For the loaders: a foreign format is one error naming file and line, not a list of line errors."""
    for p in problems:
        if p.key == PROBLEM_KEY and p.severity == "error":
            raise TuneryError(f"{path}, line {p.line}: {p.message}")


# --- one parsed object ------------------------------------------------------------------------------------


def is_openai(obj: dict[str, Any]) -> bool:
    """A line of a format Tunery reads (OpenAI chat, preference pairs, ratings; chosen/rejected pairs),
    checked line by line as it always was."""
    keys = {"messages", "preferred_output", "non_preferred_output", "chosen", "rejected", "label"}
    return bool(keys & obj.keys()) or isinstance(obj.get("input"), dict)


def line_format(obj: Any) -> str | None:
    """The foreign format of one JSON object: prompt-completion, sharegpt, alpaca, or None."""
    if not isinstance(obj, dict) or is_openai(obj):
        return None
    if "prompt" in obj and "completion" in obj:
        return "prompt-completion"
    if isinstance(obj.get("conversations"), list):
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return None


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def guess_columns(columns: list[str]) -> dict[str, list[str]] | None:
    """{role: [column, ...]} when the names say it (exactly one user and one assistant column, or the
    Alpaca trio), else None: the user has to name them."""
    names = {_norm(c): c for c in columns if c.strip()}
    system = [names[n] for n in SYSTEM_NAMES if n in names][:1]
    if "instruction" in names and "output" in names:
        user = [names["instruction"]] + ([names["input"]] if "input" in names else [])
        return {"user": user, "assistant": [names["output"]], "system": system}
    user = [names[n] for n in USER_NAMES if n in names]
    assistant = [names[n] for n in ASSISTANT_NAMES if n in names]
    if len(user) == 1 and len(assistant) == 1:
        return {"user": user, "assistant": assistant, "system": system}
    return None


def _keys(names: list[str]) -> str:
    return ", ".join(n if n.strip() else "(unnamed)" for n in names) or "(none)"


# --- the file ---------------------------------------------------------------------------------------------


def sniff_format(
    path: str | Path, max_bytes: int = MAX_FILE_BYTES, name: str | None = None
) -> Foreign | None:
    """The foreign format of a file, from its head; None for JSONL in OpenAI's formats (or unknown objects,
    or broken JSON lines: the line-by-line check says what is wrong with those). `name` is how messages
    call the file (default: `path`)."""
    path = Path(path)
    check_readable(path, max_bytes)
    with path.open("rb") as fh:
        raw = fh.read(HEAD_BYTES)
        whole = not fh.read(1)
    head = raw.decode("utf-8", errors="replace").removeprefix("\ufeff")
    if not whole and "\n" in head:
        head = head[: head.rindex("\n") + 1]  # no half line at the cut
    lines = [(n, t.rstrip("\r")) for n, t in enumerate(head.split("\n"), start=1) if t.strip()]
    if not lines:
        return None
    shown = name or str(path)
    first_number, first = lines[0]
    parsed = [(n, _loads(t)) for n, t in lines[:SAMPLE_LINES]]
    if first.lstrip().startswith("["):
        several = sum(v is not _INVALID for _, v in parsed) > 1
        if not (isinstance(parsed[0][1], list) and several):  # JSONL whose lines are arrays is JSONL
            return _sniff_array(shown, head, first_number)
    objects = [(n, v) for n, v in parsed if isinstance(v, dict)]
    if objects:
        if any(is_openai(v) for _, v in objects):
            return None
        number, obj = objects[0]
        fmt = line_format(obj)
        return None if fmt is None else Foreign(shown, fmt, number, _describe_object(fmt, obj), True)
    if first.lstrip().startswith(("{", "[")):
        return None  # JSON lines that do not parse: the line errors say where
    table = _sniff_table(shown, head, first_number, whole)
    if table is not None:
        return table
    snippet = first.strip()[:40] + ("..." if len(first.strip()) > 40 else "")
    return Foreign(shown, "text", first_number, f"plain text, not JSON ({snippet!r})", False)


_INVALID = object()


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _INVALID


def _describe_object(fmt: str, obj: dict[str, Any]) -> str:
    if fmt == "prompt-completion":
        return (
            'OpenAI\'s legacy prompt/completion format ({"prompt": ..., "completion": ...} with no "label")'
        )
    if fmt == "sharegpt":
        return 'ShareGPT format ({"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]})'
    return f"Alpaca format (keys {_keys(list(obj))})"


def _sniff_array(shown: str, head: str, number: int) -> Foreign:
    """A file that is one JSON array: described by its first element."""
    start = head.index("[") + 1
    while start < len(head) and head[start] in " \t\r\n":
        start += 1
    try:
        first, _ = json.JSONDecoder().raw_decode(head, start)
    except ValueError:
        first = None  # an element longer than the head, or broken JSON
    looks = "a whole-file JSON array, not JSONL (one object per line)"
    if not isinstance(first, dict):
        what = "" if first is None else f" of {type(first).__name__} values"
        return Foreign(shown, "json-array", number, looks.replace("array", "array" + what, 1), first is None)
    fmt, target = line_format(first) or "records", "chat"
    if is_openai(first):
        fmt = "openai"
        target = "chat" if "messages" in first else "unpaired" if "label" in first else "preference"
    needs_columns = fmt == "records" and guess_columns(list(first)) is None
    looks = (
        f"a whole-file JSON array of objects with keys {_keys(list(first))}, not JSONL (one object per line)"
    )
    return Foreign(shown, "json-array", number, looks, not needs_columns, needs_columns, target, fmt)


def _sniff_table(shown: str, head: str, number: int, whole: bool) -> Foreign | None:
    """CSV or TSV: a header of at least two names, and rows with as many fields."""
    first = head.split("\n")[number - 1]
    text = "\n".join(head.split("\n")[number - 1 :])
    for fmt, delimiter in (("tsv", "\t"), ("csv", ",")):
        if delimiter not in first:
            continue
        try:
            rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if r]
        except csv.Error:
            continue
        if not whole and len(rows) > 2:
            rows = rows[:-1]  # the last row may be cut by the head
        rows = rows[: SAMPLE_LINES + 1]
        header = [c.strip() for c in rows[0]]
        if sum(bool(c) for c in header) < 2 or any(len(c) > 100 for c in header):
            continue
        body = rows[1:]
        if body and sum(len(r) == len(header) for r in body) < 0.8 * len(body):
            continue
        kind = "a CSV file" if fmt == "csv" else "a TSV (tab-separated) file"
        needs_columns = guess_columns(header) is None
        looks = f"{kind} with columns {_keys(header)}"
        return Foreign(shown, fmt, number, looks, not needs_columns, needs_columns)
    return None
