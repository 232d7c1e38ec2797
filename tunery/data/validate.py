"""`tunery data validate`: every check of OpenAI's validator, exact token counts, and a summary.

The same code loads training data, so a file that validates is a file that trains.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from tunery.data.chat import Problem, canonical_key, check_chat_example
from tunery.data.formats import foreign_problem, raise_foreign
from tunery.data.jsonl import MAX_FILE_BYTES, read_jsonl
from tunery.data.template import TokenizedChat, tokenize_chat
from tunery.errors import TuneryError
from tunery.training.auto import auto_epochs

MIN_EXAMPLES = 10

T = TypeVar("T")


@dataclass
class Report:
    path: str
    examples: list[Any] = field(default_factory=list)  # ChatExample, or FeedbackExample (data/feedback.py)
    chats: list[Any] = field(default_factory=list)  # TokenizedChat, or TokenizedPair
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


def checked_lines(
    report: Report,
    path: str | Path,
    expect: str | None,
    max_bytes: int,
    check: Callable[[Any, int], tuple[T | None, list[Problem]]],
) -> Iterator[tuple[int, T]]:
    """Each line of the file that `check` accepts, with its number. Every problem (invalid JSON, what
    `check` found) goes into `report`. A file in a foreign format (a CSV, a JSON array, ShareGPT...) is
    said so once, as one error, and gives no lines."""
    foreign = foreign_problem(path, expect, max_bytes)
    if foreign is not None:
        report.problems.append(foreign)
        return
    for line in read_jsonl(path, max_bytes):
        if line.error is not None:
            report.problems.append(Problem(line.number, "invalid_json", line.error))
            continue
        example, problems = check(line.value, line.number)
        report.problems += problems
        if example is not None:
            yield line.number, example


def note_duplicate(report: Report, seen: dict[str, int], key: str, line: int) -> None:
    """A warning when an earlier line had the same `key`; `seen` maps each key to its first line."""
    if key in seen:
        report.problems.append(Problem(line, "duplicate_example", f"same as line {seen[key]}", "warning"))
    seen.setdefault(key, line)


def _distribution(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {
        "min": float(ordered[0]),
        "max": float(ordered[-1]),
        "mean": round(statistics.fmean(ordered), 1),
        "median": float(statistics.median(ordered)),
        "p10": pct(0.10),
        "p90": pct(0.90),
    }


def distribution_lines(stats: dict[str, Any], names: tuple[str, ...], p10: bool = True) -> list[str]:
    """One report line for each distribution (`_distribution`) in `stats` under one of `names`."""
    lines = []
    for name in names:
        d = stats.get(name)
        if d:
            low = f", p10 {d['p10']:.0f}" if p10 else ""
            lines.append(
                f"  {name.replace('_', ' ')}: min {d['min']:.0f}{low}, median {d['median']:.0f}, "
                f"mean {d['mean']}, p90 {d['p90']:.0f}, max {d['max']:.0f}"
            )
    return lines


def validate_chat_file(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    min_examples: int = MIN_EXAMPLES,
    max_bytes: int = MAX_FILE_BYTES,
) -> Report:
    """Check every line; with a tokenizer, also tokenize (exact counts, over-length examples)."""
    report = Report(str(path))
    seen: dict[str, int] = {}
    for number, example in checked_lines(report, path, "chat", max_bytes, check_chat_example):
        note_duplicate(report, seen, canonical_key(example), number)
        report.examples.append(example)
        if tokenizer is not None:
            try:
                chat = tokenize_chat(tokenizer, example, max_length)
            except TuneryError as exc:
                report.problems.append(Problem(number, "template_error", str(exc)))
                continue
            except Exception as exc:  # the model's chat template (Jinja) rejecting this example's shape
                report.problems.append(
                    Problem(
                        number,
                        "template_error",
                        f"the model's chat template cannot render this example: {exc.__class__.__name__}: {exc}",
                    )
                )
                continue
            if chat.truncated:
                keep = "kept" if chat.n_trained else "skipped: no trained token is left"
                report.problems.append(
                    Problem(
                        number,
                        "too_many_tokens",
                        f"example is longer than max_length {max_length} and is truncated from the end ({keep})",
                        "warning",
                    )
                )
            if chat.n_trained:
                report.chats.append(chat)
    n_lines_ok = len(report.examples)
    if not report.problems and n_lines_ok == 0:
        report.problems.append(Problem(None, "invalid_n_examples", "the file holds no examples"))
    elif n_lines_ok < min_examples and not report.errors:
        report.problems.append(
            Problem(
                None, "invalid_n_examples", f"{n_lines_ok} examples; at least {min_examples} are required"
            )
        )
    report.problems.sort(key=lambda p: (p.line or 0, p.severity))
    report.stats = _stats(report, max_length)
    return report


def _stats(report: Report, max_length: int | None) -> dict[str, Any]:
    examples = report.examples
    stats: dict[str, Any] = {
        "examples": len(examples),
        "errors": len(report.errors),
        "warnings": len(report.warnings),
        "missing_system_message": sum(not any(m["role"] == "system" for m in e.messages) for e in examples),
        "missing_user_message": sum(not any(m["role"] == "user" for m in e.messages) for e in examples),
        "duplicates": sum(p.key == "duplicate_example" for p in report.problems),
        "messages_per_example": _distribution([len(e.messages) for e in examples]),
    }
    if report.chats:
        tokens = [len(c.input_ids) for c in report.chats]
        stats["tokens_per_example"] = _distribution(tokens)
        stats["trained_tokens_per_example"] = _distribution([c.n_trained for c in report.chats])
        stats["truncated"] = sum(p.key == "too_many_tokens" for p in report.problems)
        stats["total_tokens"] = sum(tokens)
        epochs = auto_epochs(len(report.chats))
        stats["auto_epochs"] = epochs
        stats["estimated_trained_tokens"] = epochs * sum(tokens)
        stats["max_length"] = max_length
    return stats


def report_head(report: Report, max_problems: int) -> list[str]:
    """The first lines of a report, whatever the data: counts, then up to `max_problems` problems."""
    lines = [
        f"{report.path}: {len(report.examples)} valid examples, "
        f"{len(report.errors)} errors, {len(report.warnings)} warnings"
    ]
    for problem in report.problems[:max_problems]:
        lines.append(f"  {problem.severity:<7} {problem}")
    if len(report.problems) > max_problems:
        lines.append(f"  ... and {len(report.problems) - max_problems} more (use --json for all)")
    return lines


def format_report(report: Report, max_problems: int = 50) -> str:
    lines = report_head(report, max_problems)
    s = report.stats
    if s.get("examples"):
        lines.append(
            f"  examples without a system message: {s['missing_system_message']}; "
            f"without a user message: {s['missing_user_message']}; duplicates: {s['duplicates']}"
        )
    lines += distribution_lines(
        s, ("messages_per_example", "tokens_per_example", "trained_tokens_per_example")
    )
    if "total_tokens" in s:
        lines.append(
            f"  total tokens: {s['total_tokens']}; over max_length {s['max_length']}: {s['truncated']}; "
            f"auto epochs: {s['auto_epochs']} (~{s['estimated_trained_tokens']} trained tokens)"
        )
    return "\n".join(lines)


def load_chat_data(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    min_examples: int = MIN_EXAMPLES,
) -> list[TokenizedChat]:
    """Tokenized examples for training, or a TuneryError listing what is wrong with the file."""
    report = validate_chat_file(path, tokenizer, max_length, min_examples)
    raise_errors(path, report.errors)
    return report.chats


def raise_errors(path: str | Path, errors: list[Problem], fix: str | None = None) -> None:
    """For the loaders: a TuneryError listing the first 20 errors and how to fix them (by default: see
    `tunery data validate`); a file in a foreign format is one error instead (data/formats.py)."""
    raise_foreign(path, errors)
    if errors:
        shown = "\n".join(f"  {p}" for p in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        fix = fix or f"Fix them (see `tunery data validate {path}`) and run again."
        raise TuneryError(f"{path} has {len(errors)} errors:\n{shown}{more}\n{fix}")
