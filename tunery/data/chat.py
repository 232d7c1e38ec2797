"""OpenAI chat fine-tuning format: check one example, and normalise it for the chat template.

The checks follow OpenAI's published validator (error keys `data_type`, `missing_messages_list`,
`message_missing_key`, `message_unrecognized_key`, `unrecognized_role`, `missing_content`,
`example_missing_assistant_message`) and add what it predates: tools, tool calls, the `tool` and
`developer` roles, content parts, and `weight`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MESSAGE_KEYS = ("role", "content", "name", "function_call", "weight", "tool_calls", "tool_call_id", "refusal")
EXAMPLE_KEYS = ("messages", "tools", "parallel_tool_calls", "functions")

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    line: int | None
    key: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}[{self.key}] {self.message}"


@dataclass
class ChatExample:
    """A valid example, ready for the chat template. `weights[i]` is 1 where message i is trained."""

    line: int
    messages: list[dict[str, Any]]
    weights: list[int]
    tools: list[dict[str, Any]] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _content_text(content: Any) -> str | None:
    """Text of a message's content: a string, or a list of text parts. None when it is neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        texts = [p.get("text") for p in content]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)  # type: ignore[arg-type]
    return None


def check_chat_example(obj: Any, line: int) -> tuple[ChatExample | None, list[Problem]]:
    """Check one parsed line. Returns the normalised example (None if it has errors) and every problem."""
    problems: list[Problem] = []

    def err(key: str, message: str) -> None:
        problems.append(Problem(line, key, message))

    def warn(key: str, message: str) -> None:
        problems.append(Problem(line, key, message, "warning"))

    if not isinstance(obj, dict):
        err("data_type", f"expected a JSON object with a 'messages' list, got {type(obj).__name__}")
        return None, problems
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        err("missing_messages_list", "'messages' must be a non-empty list of {role, content} objects")
        return None, problems
    for key in obj:
        if key not in EXAMPLE_KEYS:
            warn("unrecognized_key", f"top-level key '{key}' is not part of the chat format and is ignored")

    tools = obj.get("tools")
    if tools is not None and not (
        isinstance(tools, list)
        and all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name")
            for t in tools
        )
    ):
        err(
            "invalid_tools",
            "'tools' must be a list of {type: 'function', function: {name, description, parameters}}",
        )

    normalised, weights = check_messages(messages, line, "messages", problems)

    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        err("example_missing_assistant_message", "the example has no assistant message to learn from")
    elif not any(problem.severity == "error" for problem in problems) and not any(weights):
        err(
            "no_trained_assistant_message",
            "every assistant message has weight 0, so nothing would be trained",
        )
    if any(p.severity == "error" for p in problems):
        return None, problems
    if normalised[-1]["role"] != "assistant":
        warn("last_message_not_assistant", "the last message is not from the assistant; it is context only")
    return ChatExample(line, normalised, weights, tools if tools else None, obj), problems


def check_messages(
    messages: list[Any], line: int, path: str, problems: list[Problem]
) -> tuple[list[dict[str, Any]], list[int]]:
    """Check a list of chat messages (`path` names it in messages, e.g. "input.messages"), appending to
    `problems`. Returns the messages normalised for the chat template and their training weights."""

    def err(key: str, message: str) -> None:
        problems.append(Problem(line, key, message))

    normalised: list[dict[str, Any]] = []
    weights: list[int] = []
    for i, msg in enumerate(messages):
        where = f"{path}[{i}]"
        if not isinstance(msg, dict):
            err("message_missing_key", f"{where} must be an object with 'role' and 'content'")
            continue
        role = msg.get("role")
        has_call = bool(msg.get("function_call") or msg.get("tool_calls"))
        if "role" not in msg or ("content" not in msg and not has_call):
            err("message_missing_key", f"{where} needs both 'role' and 'content'")
        for key in msg:
            if key not in MESSAGE_KEYS:
                err(
                    "message_unrecognized_key", f"{where} has key '{key}'; allowed: {', '.join(MESSAGE_KEYS)}"
                )
        if role not in ROLES:
            err("unrecognized_role", f"{where} has role {role!r}; use one of {', '.join(ROLES)}")
            continue
        content = msg.get("content")
        text = _content_text(content) if content is not None else ""
        if isinstance(content, list) and text is None:
            err("unsupported_content", f"{where} has non-text content parts; Tunery's models take text only")
            continue
        if (not content and not has_call) or text is None:
            err("missing_content", f"{where} content must be a non-empty string")
            continue
        if "weight" in msg:
            weight = msg["weight"]
            if role != "assistant":
                err("invalid_weight", f"{where}: 'weight' is only allowed on assistant messages")
                continue
            if not isinstance(weight, int) or isinstance(weight, bool) or weight not in (0, 1):
                err("invalid_weight", f"{where}: 'weight' must be 0 or 1, got {weight!r}")
                continue
        tool_calls = msg.get("tool_calls")
        if tool_calls is not None and not (
            isinstance(tool_calls, list)
            and all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in tool_calls)
        ):
            err(
                "invalid_tool_calls",
                f"{where}: 'tool_calls' must be a list of {{id, type, function}} objects",
            )
            continue
        out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        if msg.get("name"):
            out["name"] = msg["name"]
        if tool_calls:
            out["tool_calls"] = tool_calls
        if msg.get("function_call"):
            out["tool_calls"] = [{"type": "function", "function": msg["function_call"]}]
        if msg.get("tool_call_id"):
            out["tool_call_id"] = msg["tool_call_id"]
        normalised.append(out)
        weights.append(int(msg.get("weight", 1)) if role == "assistant" else 0)
    return normalised, weights


def canonical_key(example: ChatExample) -> str:
    """What makes two examples duplicates: the same messages, weights and tools."""
    return json.dumps([example.messages, example.weights, example.tools], sort_keys=True, ensure_ascii=False)
