"""A streamed reply that is a tool call in bare JSON (the format of templates with their own tool support)
comes out as `tool_calls`, never as content; a reply that only looks like one comes out as content, whole."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import openai
import pytest

from tests.server.conftest import Studio
from tests.server.test_stored_completions import ask, client_of
from tunery.server.errors import APIError
from tunery.server.settings import Settings


class Scripted:
    """An inference worker that streams a set reply a few characters at a time."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    async def stream(self, request: dict[str, Any], project: str = "") -> Any:
        pieces = [self.reply[i : i + 3] for i in range(0, len(self.reply), 3)]
        for piece in pieces:
            yield {"event": "delta", "index": 0, "text": piece}
        choice = {"index": 0, "text": self.reply, "finish_reason": "stop", "logprobs": None}
        yield {"event": "done", "result": {"choices": [choice], "prompt_tokens": 5, "completion_tokens": 9}}

    async def close(self) -> None:
        pass


TOOL = {"type": "function", "function": {"name": "get_order", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("reply", "calls"),
    [
        ('{"name": "get_order", "arguments": {"order_id": "A1"}}', 1),  # Qwen's and Hermes' without tags
        ('<|python_tag|>{"name": "get_order", "parameters": {"order_id": "A1"}}', 1),  # Llama 3.1's
        (
            '  [TOOL_CALLS] [{"name": "get_order", "arguments": {}}, {"name": "get_order", "arguments": {}}]',
            2,
        ),
        ("[1] Check the tracking page. [2] Ask us.", 0),  # no call after all: the text, whole
        ('{"status": "not a call"}', 0),
        ("Your order ships today.", 0),
    ],
)
def test_a_streamed_bare_json_call_never_goes_out_as_content(
    studio: Studio, keys: dict[str, str], reply: str, calls: int
) -> None:
    studio.client.app.state.tunery.inference = Scripted(reply)  # type: ignore[attr-defined]
    acme = client_of(studio, keys["acme"])
    stream = ask(acme, "Where is order A1?", tools=[TOOL], stream=True)
    content, got, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                got[delta.index] = delta.function
            finish = choice.finish_reason or finish
    if calls:
        assert content == "" and finish == "tool_calls" and len(got) == calls
        assert {f.name for f in got.values()} == {"get_order"}
    else:
        assert content == reply and finish == "stop" and not got


def test_a_call_in_tags_streams_its_arguments_as_they_come_and_is_stored_the_same(
    studio: Studio, keys: dict[str, str]
) -> None:
    reply = (
        'Checking.<tool_call>{"name": "get_order", "arguments": {"order_id": "A1", "fields": ["eta"]}}'
        "</tool_call> One moment."
    )
    studio.client.app.state.tunery.inference = Scripted(reply)  # type: ignore[attr-defined]
    acme = client_of(studio, keys["acme"])
    content, pieces, ids, finish, completion_id = "", [], set(), None, None
    for chunk in ask(acme, "Where is order A1?", tools=[TOOL], stream=True, store=True):
        completion_id = chunk.id
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                ids |= {delta.id} - {None}
                pieces.append(delta.function.arguments or "")
            finish = choice.finish_reason or finish
    arguments = "".join(pieces)
    assert json.loads(arguments) == {"order_id": "A1", "fields": ["eta"]}
    assert len([p for p in pieces if p]) > 5  # a few characters at a time, as the worker sent them
    assert content == "Checking. One moment." and finish == "tool_calls" and len(ids) == 1
    stored = acme.chat.completions.retrieve(completion_id or "")
    [call] = stored.choices[0].message.tool_calls or []
    assert {call.id} == ids and call.function.arguments == arguments
    assert stored.choices[0].message.content == "Checking. One moment."


class Breaking(Scripted):
    """A worker that streams part of a call, then fails."""

    async def stream(self, request: dict[str, Any], project: str = "") -> Any:
        for piece in ("Checking.", '<tool_call>{"name": "get_order", ', '"arguments": {"order_id": "A'):
            yield {"event": "delta", "index": 0, "text": piece}
        raise APIError(503, "the inference worker stopped", code="worker_failed", type="server_error")


def test_a_broken_stream_records_the_call_it_had_sent(
    studio: Studio, keys: dict[str, str], settings: Settings
) -> None:
    studio.client.app.state.tunery.inference = Breaking("")  # type: ignore[attr-defined]
    acme = client_of(studio, keys["acme"])
    sent: list[str] = []
    with contextlib.suppress(openai.APIError):
        for chunk in ask(acme, "Where is order A1?", tools=[TOOL], stream=True):
            for choice in chunk.choices:
                sent += [d.function.arguments or "" for d in choice.delta.tool_calls or []]
    assert "".join(sent) == '{"order_id": "A'
    log = [json.loads(line) for line in (settings.audit_dir / "acme.jsonl").read_text().splitlines()]
    [error] = [r["payload"] for r in log if r["type"] == "inference.error"]
    [choice] = error["partial_choices"]
    assert choice["text"] == "Checking."
    [call] = choice["tool_calls"]
    assert (call["name"], call["arguments"]) == ("get_order", '{"order_id": "A')
