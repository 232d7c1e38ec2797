"""Tool calling through the official `openai` client against a live `tunery serve`: a tiny model fine-tuned
(in the test) to call `get_order`, offered as a base model; its call comes back as OpenAI's `tool_calls`
(whole and streamed), the result goes back as a `tool` message, and tool_choice / parallel_tool_calls are
honoured or refused with the field named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import tunery_here, write_jsonl
from tests.server.test_openai_client import new_key, start_server, stop_server

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_order",
            "description": "Where an order is.",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "book_service", "parameters": {"type": "object"}}},
]
CALL = {
    "id": "c",
    "type": "function",
    "function": {"name": "get_order", "arguments": json.dumps({"order_id": "A1"})},
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    work = tmp_path_factory.mktemp("tools")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Where is order {i}?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
            ],
            "tools": TOOLS,
        }
        for i in range(16)
    ]
    data = write_jsonl(work / "tools.jsonl", rows)
    run = work / "run"
    tunery_here(["train", "sft", "--model", "tiny-random", "--data", str(data), "--out", str(run), "--epochs", "24",
                 "--batch-size", "4", "--lr", "0.01", "--full", "--safety-evals", "none", "--seed", "0",
                 "--precision", "fp32"])  # fmt: skip
    data_dir = work / "service"
    proc, url = start_server(data_dir, flags=("--base-model", f"tool-bot={run / 'final'}"))
    yield openai.OpenAI(base_url=url, api_key=new_key(data_dir, "acme"), max_retries=0)
    stop_server(proc)


QUESTION = [{"role": "user", "content": "Where is order 77?"}]


def test_a_tool_call_round_trips(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tool-bot", messages=QUESTION, tools=TOOLS, max_tokens=100, temperature=0
    )  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice.message
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_order" and json.loads(call.function.arguments) == {"order_id": "A1"}
    # the function's result goes back; the model answers (a tiny model: any text, no error)
    history = [*QUESTION, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'}]  # fmt: skip
    after = client.chat.completions.create(model="tool-bot", messages=history, tools=TOOLS, max_tokens=8)  # type: ignore[arg-type]
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_streamed_tool_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tool-bot",
        messages=QUESTION,
        tools=TOOLS,
        max_tokens=100,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": delta.id})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert content == "" and finish == "tool_calls"  # no `<tool_call>` text leaked into the content
    assert calls[0]["name"] == "get_order" and json.loads(calls[0]["arguments"]) == {"order_id": "A1"}


def test_tool_choice_and_parallel_calls(client: openai.OpenAI) -> None:
    # none: the tools are not offered, so no call is read back
    reply = client.chat.completions.create(
        model="tool-bot", messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=20, temperature=0
    )  # type: ignore[arg-type]
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason != "tool_calls"
    # a named function: the reply is made to start as a call of it
    forced = client.chat.completions.create(
        model="tool-bot", messages=QUESTION, tools=TOOLS, max_tokens=100, temperature=0,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_order"}}, parallel_tool_calls=False,
    )  # fmt: skip
    [call] = forced.choices[0].message.tool_calls or []
    assert call.function.name == "get_order"


def test_bad_tool_requests_name_the_field(client: openai.OpenAI) -> None:
    cases = [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tool-bot", messages=QUESTION, max_tokens=4, **extra)  # type: ignore[arg-type]
        assert caught.value.body["param"] == param, (extra, caught.value.body)  # type: ignore[index]
    bad_history = [
        *QUESTION,
        {"role": "assistant", "tool_calls": [{"id": "x", "type": "function", "function": {}}]},
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tool-bot", messages=bad_history, max_tokens=4)  # type: ignore[arg-type]
    assert caught.value.body["param"] == "messages[1].tool_calls[0]"  # type: ignore[index]


def test_tool_calls_in_the_history_render_for_a_model_without_tools(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    """A conversation with earlier calls and results, to a base model with tools off: still answered."""
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [CALL]},
               {"role": "tool", "tool_call_id": "c", "content": "shipped"}]  # fmt: skip
    reply = client.chat.completions.create(model="tiny-random", messages=history, max_tokens=4)  # type: ignore[arg-type]
    assert reply.choices[0].message.content is not None


# --- structured output -------------------------------------------------------------------------------------

CITY = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}, "open": {"type": "boolean"}},
    "required": ["city", "open"],
    "additionalProperties": False,
}


def test_a_json_schema_answer_always_parses(client: openai.OpenAI) -> None:
    """Constrained decoding (xgrammar): a random tiny model's answer is still valid JSON of the schema."""
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny-random",
            messages=QUESTION,
            response_format=response_format,
            max_tokens=60,
            seed=seed,  # type: ignore[arg-type]
        )
        choice = reply.choices[0]
        answer = json.loads(choice.message.content or "")
        assert choice.finish_reason == "stop" and set(answer) == {"city", "open"}
        assert answer["city"] in ("Paris", "Oslo") and isinstance(answer["open"], bool)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny-random",
            messages=QUESTION,
            response_format=response_format,
            max_tokens=60,
            stream=True,  # type: ignore[arg-type]
        )
        if c.choices
    )
    assert set(json.loads(streamed)) == {"city", "open"}


def test_the_clients_pydantic_parse(client: openai.OpenAI) -> None:
    from typing import Literal

    from pydantic import BaseModel

    class City(BaseModel):
        city: Literal["Paris", "Oslo"]
        open: bool

    reply = client.chat.completions.parse(
        model="tiny-random", messages=QUESTION, response_format=City, max_tokens=60
    )  # type: ignore[arg-type]
    assert isinstance(reply.choices[0].message.parsed, City)


def test_a_forced_call_has_arguments_in_the_functions_schema(client: openai.OpenAI) -> None:
    """tool_choice naming a function: even the untrained tiny model answers one call of it whose
    arguments fit the function's parameters."""
    tools = [{"type": "function", "function": {"name": "set_city", "parameters": CITY}}]
    reply = client.chat.completions.create(
        model="tiny-random", messages=QUESTION, tools=tools, max_tokens=120, temperature=0,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "set_city"}},
    )  # fmt: skip
    [call] = reply.choices[0].message.tool_calls or []
    assert call.function.name == "set_city" and set(json.loads(call.function.arguments)) == {"city", "open"}
    assert reply.choices[0].finish_reason == "tool_calls"


def test_bad_response_formats_name_the_field(client: openai.OpenAI) -> None:
    cases = [
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         "response_format"),
        ({"response_format": {"type": "json_object"}, "tools": TOOLS}, "response_format"),
        # repetitions a grammar compiler unrolls: 90 s of the worker for this one, refused before compiling
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "string", "pattern": "[a-z]{20000,40000}"}}}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "a": {"type": "string", "pattern": "(([a-z]{100}){100})"}}}}}],
          "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools"),
        # a patternProperties name is a pattern too (19 s of compiling for this one)
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "patternProperties": {"^[^a]{1,8192}$": {"type": "string"}}}}}}, "response_format"),
        # each alternative is compiled: 200 of these had held the worker 233 s
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "string", "pattern": "^(" + "|".join([r"\S{1,1000}"] * 200) + ")$"}}}}, "response_format"),
        # optional properties cost their square: 5,000 had compiled for 135 s
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {f"p{i}": {} for i in range(5000)}}}}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}}}]},
         "tools[0].function.parameters"),
    ]  # fmt: skip
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny-random", messages=QUESTION, max_tokens=4, **extra)  # type: ignore[arg-type]
        assert caught.value.body["param"] == param, (extra, caught.value.body)  # type: ignore[index]
        assert ".cc:" not in caught.value.body["message"]  # type: ignore[index]  # xgrammar's source lines
        if "pattern" in json.dumps(extra).lower():
            assert "spell out up to" in caught.value.body["message"]  # type: ignore[index]
        if "p4999" in json.dumps(extra) and param == "response_format":
            assert "5,000 optional properties" in caught.value.body["message"]  # type: ignore[index]


def test_many_empty_messages_are_refused_before_the_template_renders(client: openai.OpenAI) -> None:
    """Each message is at least a token of the prompt: 100,000 empty ones cannot fit any context, and are
    refused on their count (rendering the template for them took seconds of the worker)."""
    messages = [{"role": "user", "content": ""}] * 100_000
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    assert "at least 100000 tokens" in caught.value.body["message"]  # type: ignore[index]
