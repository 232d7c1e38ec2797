"""Read a JSONL file line by line, turning every way a file can be broken into a message with a line number."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError

MAX_FILE_BYTES = 512 * 1024 * 1024  # OpenAI's limit for a fine-tuning file
MAX_LINE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, as editors show it
    value: Any = None
    error: str | None = None  # set when the line is not a JSON value


def check_readable(path: Path, max_bytes: int = MAX_FILE_BYTES) -> None:
    """Fail early, with a message, on files that are missing, empty, huge or binary."""
    if not path.exists():
        raise TuneryError(f"{path}: no such file")
    if path.is_dir():
        raise TuneryError(f"{path}: is a directory; pass a .jsonl file")
    size = path.stat().st_size
    if size == 0:
        raise TuneryError(f"{path}: the file is empty; it needs one JSON object per line")
    if size > max_bytes:
        raise TuneryError(
            f"{path}: the file is {size / 2**20:.0f} MB, over the {max_bytes / 2**20:.0f} MB limit; "
            "split it or raise the limit (--max-bytes)"
        )
    try:
        with path.open("rb") as fh:
            head = fh.read(8192)
    except OSError as exc:  # no read permission, say
        raise TuneryError(f"{path}: cannot be read ({exc.strerror})") from None
    if head.startswith((b"\x1f\x8b", b"PK\x03\x04", b"\x89PNG")):
        raise TuneryError(f"{path}: is a compressed or binary file; decompress it to JSONL text first")
    if b"\x00" in head:
        raise TuneryError(
            f"{path}: looks like a binary file (it contains NUL bytes); expected UTF-8 JSONL text"
        )


# a \\uD800-\\uDFFF escape: JSON allows it; a pair of them is one character (an emoji), but one alone
# decodes to no character at all, which tokenizers refuse with an error about types
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(value: object) -> str | None:
    """The first unpaired surrogate in a parsed line's strings (paired ones were joined by json.loads)."""
    if isinstance(value, str):
        return next((ch for ch in value if "\ud800" <= ch <= "\udfff"), None)
    items = (
        [*value.keys(), *value.values()]
        if isinstance(value, dict)
        else value
        if isinstance(value, list)
        else []
    )
    return next((found for item in items if (found := _lone_surrogate(item)) is not None), None)


def read_jsonl(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> Iterator[Line]:
    """Yield every non-blank line, parsed, or with the reason it could not be parsed."""
    path = Path(path)
    check_readable(path, max_bytes)
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if len(raw) > MAX_LINE_BYTES:
                yield Line(number, error=f"line is {len(raw) / 2**20:.0f} MB, over the 16 MB per-line limit")
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark from some editors
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Line(number, error=f"not valid UTF-8 (byte {exc.start}); save the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Line(number, error=f"invalid JSON at column {exc.colno}: {exc.msg}")
                continue
            lone = _lone_surrogate(value) if _SURROGATE_ESCAPE.search(text) else None
            if lone is not None:
                yield Line(
                    number,
                    error=f"the escape \\u{ord(lone):04x} is half of a UTF-16 pair, not a character (text "
                    "written by a tool that split an emoji or symbol); fix or remove it",
                )
                continue
            yield Line(number, value=value)
