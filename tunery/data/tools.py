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
with `name` and `arguments`, the other common convention), into OpenAI's `tool_calls`. A block that opens
with one of the request's functions and its arguments (`{"name": "f", "arguments": {`) is a call from
there on, as with OpenAI's models: its `arguments` are the text the model wrote, which a stream sends as
it comes (`CallStream`), even when they end up cut short (`max_tokens`) or not valid JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tunery")

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# a block's call up to where its arguments' object begins: from here on the block is that call
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


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


def _name(raw: str) -> str | None:
    """The function name HEAD matched (a JSON string's inside), decoded."""
    try:
        name = json.loads(f'"{raw}"')
    except json.JSONDecodeError:
        return None
    return name or None


class ObjectEnd:
    """Finds where a JSON object (or list) that starts at `start` ends, reading text as it grows: the
    brackets outside strings are counted. Only the ends are found; what is inside is not checked."""

    def __init__(self, start: int) -> None:
        self.position, self.depth, self.in_string, self.escaped = start, 0, False, False
        self.end: int | None = None

    def read(self, text: str) -> int | None:
        """The index after the closing bracket, or None while it has not come yet."""
        while self.end is None and self.position < len(text):
            char = text[self.position]
            self.position += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = self.position
        return self.end


def _block_call(body: str, names: set[str] | None) -> dict[str, Any] | None:
    """The call a `<tool_call>` block's body holds, or None (then the block stays in the content)."""
    head = HEAD.match(body)
    if head is not None:  # as a stream reads it: the arguments are the text the model wrote
        name = _name(head.group(1))
        if name is None or (names is not None and name not in names):
            return None
        end = ObjectEnd(head.end()).read(body)
        arguments = body[head.end() : end] if end is not None else body[head.end() :].rstrip()
        return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    call = None
    with contextlib.suppress(json.JSONDecodeError):
        call = _call(json.loads(body))
    if call is None or (names is not None and call["function"]["name"] not in names):
        return None
    return call


def parse_tool_calls(text: str, names: set[str] | None = None) -> ParsedReply:
    """The calls in a reply. A block that is not JSON, or names no function, stays in the content;
    `names`: only these functions count (the request's tools). A block the reply ended in before closing
    it (`max_tokens`) is read as far as it goes. Blocks are found with `str.find`, in linear time (a regex
    with white space on both sides of the body backtracks cubically on an unclosed block)."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    position = looked = 0  # the text up to `position` is in `kept`; blocks are looked for from `looked`
    while (start := text.find(OPEN, looked)) >= 0:
        close = text.find(CLOSE, start + len(OPEN))
        end = len(text) if close < 0 else close + len(CLOSE)
        call = _block_call(text[start + len(OPEN) : close if close >= 0 else len(text)].strip(), names)
        if call is not None:
            kept.append(text[position:start])
            calls.append(call)
            position = end
        if close < 0:  # the last block, unclosed: whatever it holds, nothing after it is another block
            break
        looked = end
    kept.append(text[position:])
    if not calls:
        bare = _bare_calls(text)
        if bare and all(names is None or c["function"]["name"] in names for c in bare):
            return ParsedReply(None, bare)
        return ParsedReply(text, [])
    # White space around the calls goes; before text that precedes them it stays, as it was streamed
    # (a stream sends text before it knows whether a call follows).
    content = "".join(kept).rstrip() if kept[0].strip() else "".join(kept).strip()
    return ParsedReply(content or None, calls)


@dataclass
class _Following:
    """The call a stream is sending: its place among the calls, and how far its arguments went out."""

    index: int
    start: int  # where its arguments begin in the text
    end: ObjectEnd
    sent: int  # its arguments went out up to here
    looked: int  # the closing tag is not before this
    solid: int  # after the last character that is not white space, up to `looked`


# a call's head comes within this many characters of its `<tool_call>` (a function name is at most 64), or the
# stream stops following blocks and the calls go out whole at the end
HEAD_WITHIN = 256


class CallStream:
    """One streamed answer's `<tool_call>` blocks as OpenAI streams calls: when a block has named one of
    the request's functions and opened its arguments, the call goes out (index, id, name), then its
    arguments as the model writes them. Blocks this cannot follow as they come (arguments before the
    name, say) stop it; `finish` then sends those calls whole, with what is left of the others.
    `parse_tool_calls` reads a finished answer the same way, so the two agree. Each character is looked
    at a bounded number of times, whatever the text."""

    def __init__(self, names: set[str] | None, parallel: bool) -> None:
        self.names, self.parallel = names, parallel
        self.text = ""
        self.position = 0  # where the next block is looked for
        self.close_looked = 0  # the block at `position` has no closing tag before this
        self.ids: list[str] = []
        self.names_sent: list[str] = []
        self.arguments: list[str] = []  # what went out of each call's arguments
        self.following: _Following | None = None
        self.stopped = False

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The text that came; the `tool_calls` deltas it lets go out."""
        self.text += piece
        deltas: list[dict[str, Any]] = []
        while not self.stopped:
            if self.following is not None:
                if not self._follow(deltas):
                    break
                continue
            start = self.text.find(OPEN, self.position)
            if start < 0:  # none yet: nothing before the last few characters can start one
                self.position = max(self.position, len(self.text) - len(OPEN) + 1)
                break
            self.position = start
            body = start + len(OPEN)
            close = self.text.find(CLOSE, max(body, self.close_looked))
            if close < 0:
                self.close_looked = max(body, len(self.text) - len(CLOSE) + 1)
            head = HEAD.match(self.text, body, body + HEAD_WITHIN)
            if head is None or (close >= 0 and head.end() > close):
                if close >= 0 or len(self.text) - body > HEAD_WITHIN:
                    self.stopped = True  # a block this cannot follow: the rest goes out when the answer ends
                break  # else its head may still come
            name = _name(head.group(1))
            if name is None or (self.names is not None and name not in self.names):
                if close < 0:  # no call: it stays in the content, which goes out at the end
                    break
                self.position = self.close_looked = close + len(CLOSE)
                continue
            if self.ids and not self.parallel:
                self.stopped = True
                break
            call_id = new_call_id()
            self.ids.append(call_id)
            self.names_sent.append(name)
            self.arguments.append("")
            at = head.end()
            self.following = _Following(len(self.ids) - 1, at, ObjectEnd(at), at, at, at)
            function = {"name": name, "arguments": ""}
            deltas.append(
                {"index": len(self.ids) - 1, "id": call_id, "type": "function", "function": function}
            )
        return deltas

    def _follow(self, deltas: list[dict[str, Any]]) -> bool:
        """Send what came of the followed call's arguments; True when its block has closed."""
        call = self.following
        assert call is not None
        end = call.end.read(self.text)
        close = self.text.find(CLOSE, call.looked)
        # not a whole object (yet): all but trailing white space, and what may start the closing tag
        limit = close if close >= 0 else len(self.text) - held_back(self.text, CLOSE)
        for i in range(call.looked, limit):
            if not self.text[i].isspace():
                call.solid = i + 1
        call.looked = max(call.looked, limit)
        upto = end if end is not None and (close < 0 or end <= close) else call.solid
        if upto > call.sent:
            piece = self.text[call.sent : upto]
            call.sent = upto
            self.arguments[call.index] += piece
            deltas.append({"index": call.index, "function": {"arguments": piece}})
        if close < 0:
            return False
        self.position = self.close_looked = close + len(CLOSE)
        self.following = None
        return True

    def finish(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The answer's calls as `parse_tool_calls` read them (given the ids that went out, in place); the
        deltas still to send: the rest of each streamed call's arguments, and the calls not streamed."""
        deltas: list[dict[str, Any]] = []
        if len(calls) < len(self.ids):
            log.warning("a stream sent %d tool calls, the answer has %d", len(self.ids), len(calls))
        for index, call in enumerate(calls):
            if index >= len(self.ids):
                deltas.append({"index": index, **call})
                continue
            function = call["function"]
            call["id"] = self.ids[index]
            sent = self.arguments[index]
            if function["name"] != self.names_sent[index] or not function["arguments"].startswith(sent):
                # not while both read blocks alike (a stop string cut after its start went out can do it):
                # the answer keeps what the client was sent
                log.warning("tool call %d of a stream differs from the answer's; kept as it was sent", index)
                function["name"], function["arguments"] = self.names_sent[index], sent
                continue
            if len(function["arguments"]) > len(sent):
                deltas.append({"index": index, "function": {"arguments": function["arguments"][len(sent) :]}})
        return deltas


class ReplyStream:
    """What of a streamed answer to a request with tools goes out when: its text as content, up to where a
    call may begin (a `<tool_call>`, or the whole answer while it may still be calls in bare JSON), and
    white space only once something follows it, so the content sent is the content the answer keeps; its
    calls as `CallStream` sends them; `finish` gives the rest."""

    def __init__(self, names: set[str] | None, parallel: bool) -> None:
        self.text = ""
        self.calls = CallStream(names, parallel)
        self.sent = 0  # the content went out up to here
        self.opened = -1  # where the first `<tool_call>` is, once it has come
        self.looked = 0  # no `<tool_call>` starts before this
        self.solid = 0  # after the last character that is not white space, up to `looked`
        self.bare: bool | None = None  # whether the answer may be calls in bare JSON, once that is known

    def feed(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        """The text that came; the content and the `tool_calls` deltas that go out now, in that order."""
        self.text += piece
        deltas = self.calls.feed(piece)
        if self.opened < 0:
            found = self.text.find(OPEN, self.looked)
            self.opened = found
            limit = found if found >= 0 else len(self.text) - held_back(self.text)
        else:
            limit = self.opened
        for i in range(self.looked, limit):
            if not self.text[i].isspace():
                self.solid = i + 1
        self.looked = max(self.looked, limit)
        limit = self.solid  # white space waits for what follows it: before a call the answer drops it
        if self.bare is None:
            self.bare = _bare_start(self.text)
        if self.bare is not False and not self.calls.ids:
            limit = 0  # held until the end: it may be calls in bare JSON
        content = self.text[self.sent : limit] if limit > self.sent else ""
        self.sent = max(self.sent, limit)
        return content, deltas

    def finish(self, text: str, parsed: ParsedReply) -> tuple[str, list[dict[str, Any]]]:
        """The whole answer and how it parsed: the content still to send, then the calls' last deltas."""
        if not parsed.tool_calls:
            return text[self.sent :], []  # no call after all: what was held back
        done, content = self.text[: self.sent], parsed.content or ""
        rest = content[len(done) :] if content.startswith(done) else ""
        return rest, self.calls.finish(parsed.tool_calls)


def _bare_start(text: str) -> bool | None:
    """Whether a reply starting with `text` may still turn out to be calls in bare JSON (`_bare_calls`): a
    JSON object or list after any of CALL_PREFIXES; None while that is not known yet (white space, or part
    of a prefix, so far). A stream holds such a reply back until it ends, so a call never goes out as
    content."""
    stripped = text.lstrip()
    for prefix in CALL_PREFIXES:
        if prefix.startswith(stripped):
            return None
        stripped = stripped.removeprefix(prefix).lstrip()
    return None if not stripped else stripped[0] in "{["


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


def held_back(text: str, tag: str = OPEN) -> int:
    """How many characters at the end of streamed `text` may be the start of `tag` (not yet sent)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
