"""Tools in the chat format (tunery/data/tools.py): how they reach a template without tool support, what
training learns from them, and reading a model's calls back into OpenAI's `tool_calls`."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from tunery.data.chat import check_chat_example
from tunery.data.template import assistant_spans, prompt_ids, tokenize_chat
from tunery.data.tools import (
    OPEN,
    CallStream,
    ReplyStream,
    held_back,
    native_tools,
    parse_tool_calls,
    with_tools,
)
from tunery.models.tiny import tiny_tokenizer

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
CHAT = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "assistant", "content": "It is 18C in Paris."},
    ],
    "tools": TOOLS,
}


def test_calls_are_read_back_into_openai_objects() -> None:
    text = 'Let me check.<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'
    parsed = parse_tool_calls(
        text + '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    )
    assert parsed.content == "Let me check."
    assert [json.loads(c["function"]["arguments"]) for c in parsed.tool_calls] == [
        {"city": "Paris"},
        {"city": "Oslo"},
    ]
    call = parsed.tool_calls[0]
    assert (
        call["type"] == "function"
        and call["id"].startswith("call_")
        and call["function"]["name"] == "weather"
    )
    assert parsed.tool_calls[0]["id"] != parsed.tool_calls[1]["id"]
    # a bare JSON object with name and arguments (another common convention)
    assert (
        parse_tool_calls('{"name": "weather", "arguments": {}}').tool_calls[0]["function"]["arguments"]
        == "{}"
    )
    # not a call: broken JSON, an unknown function, no name
    for text in ('<tool_call>{"name": "weather", </tool_call>', '<tool_call>{"name": "nope"}</tool_call>',
                 '<tool_call>{"arguments": {}}</tool_call>', "It is sunny."):  # fmt: skip
        parsed = parse_tool_calls(text, {"weather"})
        assert parsed.tool_calls == [] and parsed.content == text


def test_the_families_own_call_formats_are_read_too() -> None:
    """Llama 3.1's JSON with `parameters` (after <|python_tag|> when it is not dropped in decoding) and
    Mistral's [TOOL_CALLS] list; a list that is not all calls, or names another function, stays content."""
    llama = '<|python_tag|>{"name": "weather", "parameters": {"city": "Paris"}}'
    mistral = '[TOOL_CALLS] [{"name": "weather", "arguments": {"city": "Oslo"}}, {"name": "weather", "arguments": {"city": "Rome"}}]'
    decoded = (
        ' [{"name": "weather", "arguments": {"city": "Oslo"}}]'  # [TOOL_CALLS] dropped as a special token
    )
    cities = [
        [
            json.loads(c["function"]["arguments"])["city"]
            for c in parse_tool_calls(text, {"weather"}).tool_calls
        ]
        for text in (llama, mistral, decoded)
    ]
    assert cities == [["Paris"], ["Oslo", "Rome"], ["Oslo"]]
    assert parse_tool_calls(mistral, {"weather"}).content is None
    for text in (
        '[{"name": "weather", "arguments": {}}, {"city": "Oslo"}]',
        '[{"name": "nope", "arguments": {}}]',
        "[]",
        "[1, 2]",
    ):
        parsed = parse_tool_calls(text, {"weather"})
        assert parsed.tool_calls == [] and parsed.content == text


def test_a_template_without_tools_gets_them_in_the_system_message() -> None:
    tokenizer = tiny_tokenizer("llama")
    assert not native_tools(tokenizer)
    messages, tools = with_tools(tokenizer, CHAT["messages"], TOOLS)
    assert tools is None and messages[0]["role"] == "system" and '"name": "weather"' in messages[0]["content"]
    assert (
        messages[2]["content"] == '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'
    )
    assert messages[3] == {"role": "tool", "content": "18C"}  # ChatML renders the tool role
    # an existing system message gets the tools after its own text
    with_system, _ = with_tools(
        tokenizer, [{"role": "system", "content": "Be brief."}, *CHAT["messages"]], TOOLS
    )
    assert with_system[0]["content"].startswith("Be brief.\n\n") and len(with_system) == 5


def test_a_template_that_renders_tools_gets_them_as_they_are() -> None:
    tokenizer = tiny_tokenizer("llama")
    tokenizer.chat_template = (
        "{% if tools %}TOOLS{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.role }}:"
        "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% else %}{{ m.content }}{% endif %}|{% endfor %}"
    )
    assert native_tools(tokenizer)
    messages, tools = with_tools(tokenizer, CHAT["messages"], TOOLS)
    assert tools == TOOLS and messages[1]["tool_calls"] == CHAT["messages"][1]["tool_calls"]


def test_training_learns_the_call_and_sees_the_tools() -> None:
    tokenizer = tiny_tokenizer("llama")
    example, problems = check_chat_example(CHAT, 1)
    assert example is not None and not problems
    full, spans = assistant_spans(tokenizer, example)
    trained = [full[a:b] for a, b in spans]
    assert trained[0].startswith(OPEN + '{"name": "weather"') and trained[1].startswith("It is 18C")
    assert "<tools>" in full and "18C<|im_end|>" in full
    chat = tokenize_chat(tokenizer, example)
    text = tokenizer.decode([t for t, m in zip(chat.input_ids, chat.label_mask, strict=True) if m])
    assert (
        "</tool_call><|im_end|>" in text
        and "<tools>" not in text
        and "18C<|im_end|>" not in text.replace("It is 18C in Paris.<|im_end|>", "")
    )
    # the service renders the same prompt as training does, up to the answer
    prompt = tokenizer.decode(prompt_ids(tokenizer, CHAT["messages"][:1], TOOLS))
    assert full.startswith(prompt)


def test_streaming_holds_back_what_may_start_a_call() -> None:
    assert held_back("Sure <tool") == len("<tool")
    assert (
        held_back("Sure <") == 1 and held_back("Sure") == 0 and held_back("<tool_call") == len("<tool_call")
    )


# --- calls streamed as they come ---------------------------------------------------------------------------

STREAMED_REPLIES = [
    'Let me look.<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>',
    '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo", "days": [1, 2]}}\n</tool_call>'
    '<tool_call>{"name": "time", "arguments": {}}</tool_call> Done.',
    # braces, quotes and the closing tag inside strings are the arguments' own
    '<tool_call>{"name": "weather", "arguments": {"city": "a}b\\"}{", "note": "[x"}}</tool_call>',
    # cut short by max_tokens: the arguments as far as they go
    '<tool_call>{"name": "weather", "arguments": {"city": "Ber',
    # not valid JSON, as a model may write it: a call all the same, its arguments as written
    '<tool_call>{"name": "weather", "arguments": {"city": "x"</tool_call>',
    '<tool_call>{"name": "weather", "arguments": {city: Rome}}</tool_call>',
    # blocks the stream cannot follow, or no call: whole at the end, or content
    '<tool_call>{"arguments": {"city": "Rome"}, "name": "weather"}</tool_call>',
    '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{"name": "time", "arguments": {}}</tool_call>',
    "No call here.",
]


def _streamed(reply: str, cuts: list[int], parallel: bool = True) -> tuple[list[dict[str, Any]], Any, int]:
    """The calls a client puts together from a CallStream fed `reply` in pieces, the parse, and how many
    deltas carried arguments before the end."""
    stream = CallStream({"weather", "time"}, parallel)
    deltas: list[dict[str, Any]] = []
    edges = [0, *cuts, len(reply)]
    for a, b in itertools.pairwise(edges):
        deltas += stream.feed(reply[a:b])
    early = sum(1 for d in deltas if d["function"].get("arguments"))
    parsed = parse_tool_calls(reply, {"weather", "time"})
    if not parallel:
        parsed.tool_calls = parsed.tool_calls[:1]
    deltas += stream.finish(parsed.tool_calls)
    return _assembled(deltas), parsed, early


def _assembled(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calls, as the openai client's stream helpers put deltas together."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        entry = calls.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
        entry["id"] = d.get("id") or entry["id"]
        entry["name"] += d["function"].get("name") or ""
        entry["arguments"] += d["function"].get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def _cuttings(text: str, trials: int) -> Iterator[list[int]]:
    """Where a stream's pieces end: a character at a time, then pieces of 1 to 12 characters at random."""
    rng = random.Random(text)
    for trial in range(trials):
        size = 1 if trial == 0 else rng.randint(1, 12)
        yield sorted(rng.sample(range(1, len(text)), min(len(text) - 1, len(text) // size)))


def test_the_arguments_go_out_as_they_are_written() -> None:
    reply = STREAMED_REPLIES[1]
    got, parsed, early = _streamed(reply, list(range(1, len(reply))))  # a character at a time
    assert [c["name"] for c in got] == ["weather", "time"] and parsed.content == "Done."
    assert json.loads(got[0]["arguments"]) == {"city": "Oslo", "days": [1, 2]}
    # a delta per character as it comes (a space waits for the next one), none left for the end
    arguments = '{"city": "Oslo", "days": [1, 2]}'
    assert early == len(arguments) - arguments.count(" ") + len("{}")
    # no closing brace of the block, white space or closing tag in them
    assert got[0]["arguments"] == '{"city": "Oslo", "days": [1, 2]}' and got[1]["arguments"] == "{}"


def test_the_stream_and_the_parse_agree_on_what_is_a_call() -> None:
    cut, parsed, _ = _streamed(STREAMED_REPLIES[3], [10, 20, 30])
    assert cut[0]["arguments"] == '{"city": "Ber' and parsed.content is None
    broken, _, _ = _streamed(STREAMED_REPLIES[5], [5])
    assert broken[0]["arguments"] == "{city: Rome}"
    # the name after the arguments: not followed as it comes, sent whole when the answer ends
    late, parsed, early = _streamed(STREAMED_REPLIES[6], list(range(1, len(STREAMED_REPLIES[6]))))
    assert early == 0 and json.loads(late[0]["arguments"]) == {"city": "Rome"}
    # an unknown function stays in the content; the known one after it is a call
    mixed, parsed, _ = _streamed(STREAMED_REPLIES[7], [3])
    assert [c["name"] for c in mixed] == ["time"] and parsed.content.startswith("<tool_call>")
    # parallel_tool_calls false: the first call only
    first, _, _ = _streamed(STREAMED_REPLIES[1], [7, 50], parallel=False)
    assert [c["name"] for c in first] == ["weather"]
    assert _streamed("No call here.", [4])[0] == []


def _reply(
    text: str, cuts: list[int], names: set[str] | None = None
) -> tuple[str, list[dict[str, Any]], Any]:
    """What a client assembles from a ReplyStream fed `text` in pieces (content, calls), and the parse the
    answer is stored with (its ids set by the stream)."""
    names = {"weather", "time"} if names is None else names
    reply = ReplyStream(names, True)
    content, deltas = "", []
    for a, b in itertools.pairwise([0, *cuts, len(text)]):
        piece, more = reply.feed(text[a:b])
        content, deltas = content + piece, deltas + more
    parsed = parse_tool_calls(text, names)
    rest, more = reply.finish(text, parsed)
    return content + rest, _assembled(deltas + more), parsed


REPLIES = [
    *STREAMED_REPLIES,
    'Checking. <tool_call>{"name": "time", "arguments": {}}</tool_call> Done.',
    'Let me check that for you.\n<tool_call>{"name": "time", "arguments": {}}</tool_call>',
    '  <tool_call>{"name": "time", "arguments": {}}</tool_call>',
    '  Sure.\n<tool_call>{"name": "time", "arguments": {}}</tool_call>  Done. ',  # streamed as it came
    'Hi <tool_call>{"name": "time", "arguments": {}}</tool_call> x <tool_call>{"name": "time", "arguments": {}}</tool_call> y',
    # a second `<tool_call>` after an unclosed call, or inside its arguments: one call, the first
    '<tool_call>{"name": "weather", "arguments": {"a": 1}}\n<tool_call>',
    '<tool_call>{"name": "weather", "arguments": {"q": "<tool_call>{"name": "time", "arguments": {}}',
    '[1] Checking.<tool_call>{"name": "time", "arguments": {}}</tool_call>',
    '{"name": "weather", "arguments": {"city": "Oslo"}}',  # bare JSON: held, then whole
    "Plain answer with trailing space and a newline \n",
]


@pytest.mark.parametrize("text", REPLIES)
def test_a_streamed_reply_adds_up_to_the_stored_one(text: str) -> None:
    """However the text is cut into pieces, the client gets the content and calls the answer is stored
    with: the same ids, names and arguments."""
    for cuts in _cuttings(text, 50):
        content, calls, parsed = _reply(text, cuts)
        fresh = parse_tool_calls(text, {"weather", "time"})  # untouched by the stream
        want = [
            {"id": c["id"], "name": f["function"]["name"], "arguments": f["function"]["arguments"]}
            for c, f in zip(parsed.tool_calls, fresh.tool_calls, strict=True)
        ]
        assert calls == want, (text, cuts)
        assert content == (fresh.content or "" if fresh.tool_calls else text), (text, cuts)


def test_text_before_a_call_goes_out_before_the_call() -> None:
    reply = ReplyStream({"time"}, True)
    order = []
    for char in '[1] Checking.<tool_call>{"name": "time", "arguments": {}}</tool_call>':
        piece, deltas = reply.feed(char)
        order += ["content"] * bool(piece) + ["call"] * len(deltas)
    assert order.index("content") < order.index("call")  # "[1]" may have been bare JSON until the call


def test_hostile_replies_take_linear_time() -> None:
    """White space after an unclosed `<tool_call>` made the block regex backtrack cubically (a reply of
    newlines: minutes), and the stream's white-space trim and head matching went over the same text on
    every piece (quadratic). In a child process with 60 s of CPU, 200,000 characters of each must be
    parsed and streamed in pieces of a few characters (linear: about a second; otherwise hours)."""
    import resource
    import subprocess
    import sys

    code = """
from tunery.data.tools import ReplyStream, parse_tool_calls
n = 200_000
texts = [
    "Sure. <tool_call>" + "\\n" * n,
    "<tool_call>" * (n // 11),
    '<tool_call>{"name": "weather", "arguments": {"a": "' + " " * n,
    '<tool_call>{"name": "weather", "arguments": {' + "        " * (n // 8),
    '<tool_call>{"name": "' + "x" * n,
    "<tool_call>" + " " * n + '{"name": "weather", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "nope", "arguments": {"a": "' + "y" * n,
]
for text in texts:
    reply = ReplyStream({"weather"}, True)
    for i in range(0, len(text), 4):
        reply.feed(text[i : i + 4])
    reply.finish(text, parse_tool_calls(text, {"weather"}))
print("done")
"""

    def cpu_limit() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (60, 60))

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=cpu_limit, timeout=600
    )
    assert out.stdout.strip() == "done", out.stderr[-2000:]
