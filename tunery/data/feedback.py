"""Human feedback data: preference pairs and unpaired thumbs up/down, checked line by line.

Accepted forms, one JSON object per line:

    OpenAI DPO     {"input": {"messages": [...], "tools": [...]},
                    "preferred_output": [{"role": "assistant", ...}], "non_preferred_output": [...]}
    pairs          {"prompt": "..." | [messages], "chosen": "..." | [messages], "rejected": ...}
                   (without "prompt", chosen and rejected may be whole conversations sharing a prefix)
    unpaired       {"prompt": ... | "messages": [...], "completion": "..." | [messages], "label": true|false}

A {"prompt", "completion"} line without "label" is OpenAI's legacy completion format, not a rating: a file
of them is reported as such (data/formats.py), with the command that converts it to chat data.

Pairs may carry `"margin": x` (x >= 0), a required reward gap for reward models (graded preferences).
Prompts may be multi-turn; earlier assistant turns are context and are never trained.

Token layout: a pair tokenizes to a shared prompt and two continuations, so packing can run the prompt
once for both answers (models/attention.py). Each continuation ends at its end-of-turn token.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from tunery.data.chat import EXAMPLE_KEYS, ChatExample, Problem, check_messages
from tunery.data.formats import sniff_format
from tunery.data.jsonl import MAX_FILE_BYTES, read_jsonl
from tunery.data.template import tokenize_chat
from tunery.data.validate import (
    MIN_EXAMPLES,
    Report,
    _distribution,
    checked_lines,
    distribution_lines,
    note_duplicate,
    raise_errors,
    report_head,
)
from tunery.errors import TuneryError

Kind = Literal["chat", "preference", "unpaired"]
LineKind = Kind | Literal["prompt-completion"]


@dataclass
class FeedbackExample:
    """A valid line: a prompt and one or two answers, normalised for the chat template."""

    line: int
    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]  # the preferred answer, or the rated completion (unpaired)
    rejected: list[dict[str, Any]] | None = None  # None for unpaired feedback
    label: bool | None = None  # unpaired: thumbs up (True) or down
    margin: float | None = None
    tools: list[dict[str, Any]] | None = None


@dataclass
class TokenizedPair:
    """`prompt_ids + chosen_ids` and `prompt_ids + rejected_ids` are the two full sequences. Masks mark
    trained tokens (the answer and its end-of-turn token). Unpaired feedback has no rejected tokens."""

    line: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_mask: list[bool]
    rejected_ids: list[int] = field(default_factory=list)
    rejected_mask: list[bool] = field(default_factory=list)
    label: bool | None = None
    margin: float = 0.0

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def detect_kind(obj: Any) -> LineKind | None:
    """Which format a parsed line is written in, from its keys. A completion without a label or messages
    is OpenAI's legacy prompt/completion format; in a file of ratings, it is a rating missing its label."""
    if not isinstance(obj, dict):
        return None
    if "label" in obj:
        return "unpaired"
    if "completion" in obj:
        return "unpaired" if "messages" in obj else "prompt-completion"
    if {"input", "preferred_output", "non_preferred_output", "chosen", "rejected"} & obj.keys():
        return "preference"
    if "messages" in obj:
        return "chat"
    return None


def detect_file_kind(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A foreign format's name (data/formats.py: "csv", "prompt-completion", ...), else the OpenAI format
    of the first parseable line (chat when nothing tells)."""
    foreign = sniff_format(path, max_bytes)
    if foreign is not None:
        return foreign.format
    for line in read_jsonl(path, max_bytes):
        if line.error is None:
            kind = detect_kind(line.value)
            return "unpaired" if kind == "prompt-completion" else kind or "chat"
    return "chat"


# --- checking one line -----------------------------------------------------------------------------------


def _check_turns(
    value: Any, role: str, path: str, line: int, problems: list[Problem], missing: Problem
) -> list[dict[str, Any]] | None:
    """`value` as normalised messages: a string is one message of `role`, a list is taken as messages.
    None when it is neither (`missing` is the problem) or when a message is invalid."""
    messages = [{"role": role, "content": value}] if isinstance(value, str) else value
    if not isinstance(messages, list) or not messages:
        problems.append(missing)
        return None
    normalised, _ = check_messages(messages, line, path, problems)
    return normalised if len(normalised) == len(messages) else None


def _check_answer(value: Any, path: str, line: int, problems: list[Problem]) -> list[dict[str, Any]] | None:
    missing = Problem(
        line, "invalid_output", f"'{path}' must be an answer string or a list with one assistant message"
    )
    normalised = _check_turns(value, "assistant", path, line, problems, missing)
    if normalised is not None and any(m["role"] != "assistant" for m in normalised):
        problems.append(
            Problem(line, "invalid_output", f"'{path}' must hold assistant messages only (the answer)")
        )
        return None
    return normalised


def _check_prompt(value: Any, path: str, line: int, problems: list[Problem]) -> list[dict[str, Any]] | None:
    missing = Problem(
        line, "missing_prompt", f"'{path}' must be a prompt string or a non-empty list of messages"
    )
    normalised = _check_turns(value, "user", path, line, problems, missing)
    if normalised is not None and normalised[-1]["role"] == "assistant":
        problems.append(
            Problem(
                line,
                "prompt_ends_with_assistant",
                f"'{path}' ends with an assistant message; it must end with the user (or tool) turn "
                "that the answers reply to",
            )
        )
        return None
    return normalised


def _split_conversations(chosen: list[Any], rejected: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """Whole conversations without a 'prompt': the common leading messages are the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def check_feedback_example(obj: Any, line: int) -> tuple[FeedbackExample | None, list[Problem]]:
    """Check one parsed line of preference or unpaired feedback."""
    problems: list[Problem] = []

    def err(key: str, message: str) -> None:
        problems.append(Problem(line, key, message))

    kind = detect_kind(obj)
    if kind == "prompt-completion":  # a line of a file of ratings: its missing label is the error
        kind = "unpaired"
    if kind is None or kind == "chat" or not isinstance(obj, dict):
        err(
            "data_type",
            "expected a preference pair ({input, preferred_output, non_preferred_output} or "
            "{prompt, chosen, rejected}) or a rating ({prompt, completion, label})",
        )
        return None, problems
    known = set(EXAMPLE_KEYS) | {
        "input",
        "preferred_output",
        "non_preferred_output",
        "prompt",
        "chosen",
        "rejected",
        "margin",
        "completion",
        "label",
    }
    for key in obj:
        if key not in known:
            problems.append(Problem(line, "unrecognized_key", f"key '{key}' is ignored", "warning"))

    tools = None
    if "input" in obj:
        source = obj["input"]
        if not isinstance(source, dict) or not isinstance(source.get("messages"), list):
            err("missing_messages_list", "'input' must be an object with a 'messages' list (the prompt)")
            return None, problems
        tools = source.get("tools") or None
        prompt = _check_prompt(source["messages"], "input.messages", line, problems)
        for name in ("preferred_output", "non_preferred_output"):
            value = obj.get(name)
            if not (isinstance(value, list) and len(value) == 1):
                err("invalid_output", f"'{name}' must be a list holding exactly one assistant message")
        if problems and any(p.severity == "error" for p in problems):
            return None, problems
        chosen = _check_answer(obj["preferred_output"], "preferred_output", line, problems)
        rejected = _check_answer(obj["non_preferred_output"], "non_preferred_output", line, problems)
    elif kind == "preference":
        tools = obj.get("tools") or None
        for name in ("chosen", "rejected"):
            if name not in obj:
                err("missing_field", f"'{name}' is missing; a pair needs 'chosen' and 'rejected' answers")
        if problems and any(p.severity == "error" for p in problems):
            return None, problems
        raw_prompt, raw_chosen, raw_rejected = obj.get("prompt"), obj["chosen"], obj["rejected"]
        if raw_prompt is None:
            if not (isinstance(raw_chosen, list) and isinstance(raw_rejected, list)):
                err("missing_prompt", "'prompt' is missing (or give chosen/rejected as whole conversations)")
                return None, problems
            raw_prompt, raw_chosen, raw_rejected = _split_conversations(raw_chosen, raw_rejected)
        prompt = _check_prompt(raw_prompt, "prompt", line, problems)
        chosen = _check_answer(raw_chosen, "chosen", line, problems)
        rejected = _check_answer(raw_rejected, "rejected", line, problems)
    else:
        raw_prompt = obj.get("prompt", obj.get("messages"))
        prompt = _check_prompt(raw_prompt, "prompt" if "prompt" in obj else "messages", line, problems)
        chosen = _check_answer(obj.get("completion"), "completion", line, problems)
        rejected = None
        label = obj.get("label")
        if not isinstance(label, bool):
            err("invalid_label", f"'label' must be true (thumbs up) or false (thumbs down), got {label!r}")

    margin = obj.get("margin")
    if margin is not None and (
        isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < 1e6
    ):
        err("invalid_margin", f"'margin' must be a number >= 0, got {margin!r}")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        err("invalid_tools", "'tools' must be a list of {type: 'function', function: {...}} objects")
    if any(p.severity == "error" for p in problems) or prompt is None or chosen is None:
        return None, problems
    if kind == "preference":
        if rejected is None:
            return None, problems
        if chosen == rejected:
            problems.append(
                Problem(line, "identical_pair", "the preferred and rejected answers are the same", "warning")
            )
        return FeedbackExample(line, prompt, chosen, rejected, margin=margin, tools=tools), problems
    return FeedbackExample(line, prompt, chosen, label=bool(obj["label"]), tools=tools), problems


# --- tokenization ----------------------------------------------------------------------------------------


def _tokenize_branch(
    tokenizer: PreTrainedTokenizerBase, example: FeedbackExample, answer: list[dict[str, Any]]
) -> tuple[list[int], list[bool]]:
    """The full sequence of prompt + answer, cut after its last trained token."""
    weights = [0] * len(example.prompt) + [1] * len(answer)
    chat = tokenize_chat(
        tokenizer, ChatExample(example.line, example.prompt + answer, weights, example.tools)
    )
    trained = [i for i, m in enumerate(chat.label_mask) if m]
    if not trained:
        raise TuneryError(f"line {example.line}: the answer has no tokens after the chat template")
    end = trained[-1] + 1
    return chat.input_ids[:end], chat.label_mask[:end]


def tokenize_feedback(
    tokenizer: PreTrainedTokenizerBase, example: FeedbackExample, max_length: int | None = None
) -> tuple[TokenizedPair, bool]:
    """Token ids with the shared prompt split off, and whether a sequence was truncated to max_length."""
    chosen_ids, chosen_mask = _tokenize_branch(tokenizer, example, example.chosen)
    branches = [(chosen_ids, chosen_mask)]
    if example.rejected is not None:
        branches.append(_tokenize_branch(tokenizer, example, example.rejected))
    # The shared prefix stops before the first trained token of either answer.
    n_prompt = min(mask.index(True) for _, mask in branches)
    for ids, _ in branches[1:]:
        common = 0
        while common < n_prompt and ids[common] == chosen_ids[common]:
            common += 1
        n_prompt = common
    truncated = False
    cut: list[tuple[list[int], list[bool]]] = []
    for ids, mask in branches:
        if max_length is not None and len(ids) > max_length:
            ids, mask, truncated = ids[:max_length], mask[:max_length], True
        cut.append((ids[n_prompt:], mask[n_prompt:]))
    pair = TokenizedPair(
        example.line,
        chosen_ids[:n_prompt],
        cut[0][0],
        cut[0][1],
        label=example.label,
        margin=float(example.margin or 0.0),
    )
    if len(cut) == 2:
        pair.rejected_ids, pair.rejected_mask = cut[1]
    return pair, truncated


# --- a whole file ----------------------------------------------------------------------------------------


def validate_feedback_file(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    min_examples: int = MIN_EXAMPLES,
    max_bytes: int = MAX_FILE_BYTES,
    expect: Kind | None = None,
) -> Report:
    """Check every line of a preference or unpaired file, tokenize it, and describe the feedback."""
    report = Report(str(path))
    kinds: Counter[str] = Counter()
    seen: dict[str, int] = {}
    for number, example in checked_lines(report, path, expect, max_bytes, check_feedback_example):
        kind = "unpaired" if example.rejected is None else "preference"
        kinds[kind] += 1
        if expect is not None and kind != expect:
            report.problems.append(
                Problem(
                    number,
                    "wrong_format",
                    f"this line is {kind} feedback, but this method trains on {expect} feedback",
                )
            )
            continue
        key = json.dumps([example.prompt, example.chosen, example.rejected, example.label], sort_keys=True)
        note_duplicate(report, seen, key, number)
        report.examples.append(example)
        if tokenizer is None:
            continue
        try:
            pair, truncated = tokenize_feedback(tokenizer, example, max_length)
        except TuneryError as exc:
            report.problems.append(Problem(number, "template_error", str(exc)))
            continue
        except Exception as exc:  # the model's chat template (Jinja) rejecting this example's shape
            report.problems.append(
                Problem(number, "template_error", f"the chat template cannot render this line: {exc}")
            )
            continue
        usable = any(pair.chosen_mask) and (example.rejected is None or any(pair.rejected_mask))
        if truncated:
            report.problems.append(
                Problem(
                    number,
                    "too_many_tokens",
                    f"longer than max_length {max_length}; answers are truncated from the end "
                    + ("(kept)" if usable else "(skipped: an answer has no token left)"),
                    "warning",
                )
            )
        if usable:
            report.chats.append(pair)
    if len(kinds) > 1 and expect is None:
        report.problems.append(
            Problem(None, "mixed_formats", f"the file mixes formats ({dict(kinds)}); use one per file")
        )
    n_ok = len(report.examples)
    if n_ok == 0 and not report.errors:
        report.problems.append(Problem(None, "invalid_n_examples", "the file holds no examples"))
    elif n_ok < min_examples and not report.errors:
        report.problems.append(
            Problem(None, "invalid_n_examples", f"{n_ok} examples; at least {min_examples} are required")
        )
    _find_contradictions(report)
    report.problems.sort(key=lambda p: (p.line or 0, p.severity))
    report.stats = feedback_stats(report)
    return report


def _text(messages: list[dict[str, Any]] | None) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def _find_contradictions(report: Report) -> None:
    """Pairs whose labels disagree with another line's: A over B here, B over A there; or the same answer
    rated both up and down."""
    verdicts: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for ex in report.examples:
        prompt = _text(ex.prompt)
        if ex.rejected is not None:
            a, b = sorted([_text(ex.chosen), _text(ex.rejected)])
            verdicts[(prompt, a + "\x00" + b)].append((ex.line, _text(ex.chosen)))
        else:
            verdicts[(prompt, _text(ex.chosen))].append((ex.line, str(ex.label)))
    for lines in verdicts.values():
        if len({v for _, v in lines}) > 1:
            first = lines[0][0]
            for number, _ in lines[1:]:
                report.problems.append(
                    Problem(
                        number,
                        "contradicting_labels",
                        f"line {first} judges the same answers the other way",
                        "warning",
                    )
                )


def feedback_stats(report: Report) -> dict[str, Any]:
    examples: list[FeedbackExample] = report.examples
    pairs = [e for e in examples if e.rejected is not None]
    rated = [e for e in examples if e.rejected is None]
    stats: dict[str, Any] = {
        "examples": len(examples),
        "errors": len(report.errors),
        "warnings": len(report.warnings),
        "distinct_prompts": len({_text(e.prompt) for e in examples}),
        "multi_turn_prompts": sum(sum(m["role"] == "user" for m in e.prompt) > 1 for e in examples),
        "duplicates": sum(p.key == "duplicate_example" for p in report.problems),
        "contradicting_labels": sum(p.key == "contradicting_labels" for p in report.problems),
    }
    if pairs:
        stats["pairs"] = len(pairs)
        stats["identical_pairs"] = sum(p.key == "identical_pair" for p in report.problems)
        tokenized: list[TokenizedPair] = report.chats
        if tokenized:
            longer = [len(p.chosen_ids) > len(p.rejected_ids) for p in tokenized]
            stats["length_unit"] = "tokens"
        else:
            longer = [len(_text(e.chosen)) > len(_text(e.rejected)) for e in pairs]
            stats["length_unit"] = "characters"
        stats["chosen_longer_fraction"] = round(sum(longer) / len(longer), 3)
    if rated:
        stats["ratings"] = len(rated)
        stats["thumbs_up_fraction"] = round(sum(bool(e.label) for e in rated) / len(rated), 3)
    if report.chats:
        tokenized = report.chats
        stats["prompt_tokens"] = _distribution([len(p.prompt_ids) for p in tokenized])
        stats["chosen_tokens"] = _distribution([len(p.chosen_ids) for p in tokenized])
        if pairs:
            stats["rejected_tokens"] = _distribution([len(p.rejected_ids) for p in tokenized])
        stats["total_tokens"] = sum(p.n_tokens for p in tokenized)
        stats["truncated"] = sum(p.key == "too_many_tokens" for p in report.problems)
    return stats


def format_feedback_report(report: Report, max_problems: int = 50) -> str:
    s = report.stats
    lines = report_head(report, max_problems)
    if not s.get("examples"):
        return "\n".join(lines)
    lines.append(
        f"  distinct prompts: {s['distinct_prompts']}; lines with multi-turn prompts: {s['multi_turn_prompts']}; "
        f"duplicates: {s['duplicates']}; contradicting labels: {s['contradicting_labels']}"
    )
    if "pairs" in s:
        share = s["chosen_longer_fraction"]
        note = ""
        if abs(share - 0.5) > 0.2:
            note = (
                " - a strong length bias: a reward model can learn to prefer "
                + ("longer" if share > 0.5 else "shorter")
                + " answers instead of better ones"
            )
        lines.append(
            f"  pairs: {s['pairs']}; identical pairs: {s['identical_pairs']}; the preferred answer is the "
            f"longer one ({s['length_unit']}) in {share:.0%}{note}"
        )
    if "ratings" in s:
        up = s["thumbs_up_fraction"]
        note = " - unbalanced; consider desirable/undesirable weights" if abs(up - 0.5) > 0.25 else ""
        lines.append(f"  ratings: {s['ratings']}; thumbs up: {up:.0%}{note}")
    lines += distribution_lines(s, ("prompt_tokens", "chosen_tokens", "rejected_tokens"), p10=False)
    if "total_tokens" in s:
        lines.append(
            f"  total tokens (prompt counted once per line): {s['total_tokens']}; truncated: {s['truncated']}"
        )
    return "\n".join(lines)


def load_feedback_data(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    expect: Kind,
    min_examples: int = MIN_EXAMPLES,
) -> list[TokenizedPair]:
    """Tokenized feedback for training, or a TuneryError listing what is wrong with the file."""
    report = validate_feedback_file(path, tokenizer, max_length, min_examples, expect=expect)
    raise_errors(path, report.errors)
    return report.chats


def load_feedback_splits(
    train_path: str | Path,
    valid_path: str | Path | None,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    expect: Kind,
) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """The training feedback and the held-out feedback (none without a validation file, at least one
    example with one)."""
    train = load_feedback_data(train_path, tokenizer, max_length, expect)
    valid = (
        load_feedback_data(valid_path, tokenizer, max_length, expect, min_examples=1) if valid_path else []
    )
    return train, valid
