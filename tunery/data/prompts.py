"""Prompt data for reinforcement fine-tuning: OpenAI's format, one task per line.

    {"messages": [{"role": "user", "content": "What is 7 + 5? Answer with the number only."}],
     "answer": "12"}

`messages` is the conversation to continue (it must not end with an assistant turn); every other key is
passed to the graders as `{{item.<key>}}`. `tools` is reserved, as in OpenAI's format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunery.data.chat import Problem, check_messages
from tunery.data.formats import foreign_problem
from tunery.data.jsonl import read_jsonl
from tunery.data.template import prompt_ids
from tunery.data.validate import raise_errors
from tunery.errors import TuneryError


@dataclass
class PromptItem:
    line: int
    messages: list[dict[str, Any]]
    prompt_ids: list[int]
    item: dict[str, Any]  # the whole line, as graders see it


@dataclass
class PromptReport:
    items: list[PromptItem] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    too_long: list[int] = field(default_factory=list)  # lines whose prompt exceeds max_prompt_length


def check_prompt_line(obj: Any, line: int, problems: list[Problem]) -> list[dict[str, Any]] | None:
    """The normalised messages of one line, or None (with `problems` appended)."""
    if not isinstance(obj, dict):
        problems.append(Problem(line, "data_type", "each line must be a JSON object with 'messages'"))
        return None
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        problems.append(
            Problem(line, "missing_messages_list", "needs 'messages': a non-empty list of chat messages")
        )
        return None
    found: list[Problem] = []
    normalised, _ = check_messages(messages, line, "messages", found)
    problems += found
    if found:
        return None
    if normalised[-1]["role"] == "assistant":
        problems.append(
            Problem(
                line,
                "prompt_ends_with_assistant",
                "the last message is the assistant's; a prompt ends with the turn the model answers",
            )
        )
        return None
    return normalised


def validate_prompt_file(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int | None
) -> PromptReport:
    report = PromptReport()
    foreign = foreign_problem(path, "prompts")
    if foreign is not None:
        report.errors.append(foreign)
        return report
    for line in read_jsonl(path):
        if line.error is not None:
            report.errors.append(Problem(line.number, "invalid_json", line.error))
            continue
        messages = check_prompt_line(line.value, line.number, report.errors)
        if messages is None:
            continue
        ids = prompt_ids(tokenizer, messages)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            report.too_long.append(line.number)
            continue
        report.items.append(PromptItem(line.number, messages, ids, line.value))
    return report


def load_prompt_data(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int | None = None
) -> tuple[list[PromptItem], list[int]]:
    """The prompts of a file and the lines skipped as too long, or a TuneryError listing what is wrong."""
    report = validate_prompt_file(path, tokenizer, max_prompt_length)
    raise_errors(path, report.errors, fix="Fix them and run again.")
    if not report.items:
        raise TuneryError(
            f"{path}: no usable prompts"
            + (f" ({len(report.too_long)} longer than max_prompt_length)" if report.too_long else "")
        )
    return report.items, report.too_long
