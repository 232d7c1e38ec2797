"""Tool calling in the chat format: how tools, tool calls and tool results reach the model, in training and
in the service, and how the model's calls are read back.

A chat template that renders tools itself (it reads `tools` and each message's `tool_calls`, as Qwen 2.5's
does) gets them natively. For one that does not (SmolLM2's, and the tiny models'), Tunery writes them
into the conversation in one fixed format, the same in training and in the service:

- the tools' JSON schemas go at the end of the system message (one is added when there is none), inside
  `<tools></tools>`, with one sentence saying how to call them;
- an assistant message's calls are appended to its content, each as
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- a tool result stays a `tool` message if the template renders that role, else becomes a user message
  `<tool_response>...</tool_response>`.

`parse_tool_calls` reads `<tool_call>` blocks back from a reply (and a reply that is one bare JSON object
with `name` and `arguments`, the other common convention), into OpenAI's `tool_calls`.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def native_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders tools and tool calls itself."""
    template = str(getattr(tokenizer, "chat_template", "") or "")
    return "tools" in template and "tool_calls" in template


def renders_tool_role(tokenizer: Any) -> bool:
    """Whether the template renders a `tool` message (ChatML does; Gemma's raises on unknown roles)."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "tool", "content": "TUNERYTOOLRESULT"}],
            tokenize=False,
        )
    except Exception:  # noqa: BLE001 (a template that raises on the role)
        return False
    return "TUNERYTOOLRESULT" in str(text)


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    schemas = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return (
        "You can call these functions. To call one, answer with "
        '<tool_call>{"name": "FUNCTION", "arguments": {...}}</tool_call>, once for each call.\n'
        f"<tools>\n{schemas}\n</tools>"
    )


def call_text(call: dict[str, Any]) -> str:
    """One OpenAI tool call (`{"function": {"name", "arguments": "<json>"}}`) as the model writes it."""
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):  # else kept as the string it is
            arguments = json.loads(arguments)
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN}{body}{CLOSE}"


def with_tools(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages (and tools) to give the chat template. Native templates get them as they are."""
    if native_tools(tokenizer):
        return [dict(m) for m in messages], tools
    out: list[dict[str, Any]] = []
    tool_role = None
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = "".join(call_text(c) for c in message.pop("tool_calls"))
            message["content"] = (message.get("content") or "") + calls
        if message.get("role") == "tool":
            if tool_role is None:
                tool_role = renders_tool_role(tokenizer)
            if not tool_role:
                message = {
                    "role": "user",
                    "content": f"<tool_response>{message.get('content') or ''}</tool_response>",
                }
            else:
                message = {"role": "tool", "content": message.get("content") or ""}
        message.pop("tool_call_id", None)
        message.pop("name", None) if message.get("role") == "tool" else None
        out.append(message)
    if tools:
        prompt = tools_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


@dataclass
class ParsedReply:
    content: str | None  # the text outside the calls (None when there is none)
    tool_calls: list[dict[str, Any]]  # OpenAI's objects: {id, type: function, function: {name, arguments}}


def new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18).replace("-", "a").replace("_", "b")[:24]


def _call(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        return None
    arguments = raw.get("arguments", raw.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": raw["name"], "arguments": arguments},
    }


def parse_tool_calls(text: str, names: set[str] | None = None) -> ParsedReply:
    """The calls in a reply. A block that is not JSON, or names no function, stays in the content;
    `names`: only these functions count (the request's tools)."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    position = 0
    for match in BLOCK.finditer(text):
        call = None
        with contextlib.suppress(json.JSONDecodeError):
            call = _call(json.loads(match.group(1)))
        if call is not None and (names is None or call["function"]["name"] in names):
            kept.append(text[position : match.start()])
            calls.append(call)
            position = match.end()
    kept.append(text[position:])
    if not calls:
        bare = _bare_calls(text)
        if bare and all(names is None or c["function"]["name"] in names for c in bare):
            return ParsedReply(None, bare)
        return ParsedReply(text, [])
    content = "".join(kept).strip()
    return ParsedReply(content or None, calls)


# what a template's own tool format puts before the calls, when the text still has it (special tokens are
# usually dropped when decoding): Llama 3.1's <|python_tag|>, Mistral's [TOOL_CALLS]
CALL_PREFIXES = ("<|python_tag|>", "[TOOL_CALLS]")


def _bare_calls(text: str) -> list[dict[str, Any]]:
    """A reply that is nothing but calls in JSON: one object (Llama 3.1's `{"name": ..., "parameters":
    ...}`, Qwen's without the tags) or a list of them (Mistral's `[TOOL_CALLS] [{"name": ..., "arguments":
    ...}]`). [] when the reply is anything else."""
    stripped = text.strip()
    for prefix in CALL_PREFIXES:
        stripped = stripped.removeprefix(prefix).strip()
    if not (stripped.startswith(("{", "[")) and stripped.endswith(("}", "]"))):
        return []
    try:
        parsed = json.loads(stripped)
    except json.JSONDecodeError:
        return []
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = [_call(item) for item in items]
    return [c for c in calls if c is not None] if items and all(calls) else []


def may_be_bare_call(text: str) -> bool:
    """Whether a reply that begins with `text` may still turn out to be calls in bare JSON (`_bare_calls`):
    nothing but white space so far, or a JSON object or list, after any of CALL_PREFIXES. A stream holds
    such a reply back until it ends, so a call never goes out as content."""
    stripped = text.lstrip()
    for prefix in CALL_PREFIXES:
        if prefix.startswith(stripped):
            return True
        stripped = stripped.removeprefix(prefix).lstrip()
    return not stripped or stripped[0] in "{["


def held_back(text: str) -> int:
    """How many characters at the end of streamed `text` may be the start of `<tool_call>` (not yet sent)."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0
