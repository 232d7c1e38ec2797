"""Chat template -> token ids and a loss mask that covers exactly the trained assistant turns.

The mask does not rely on `{% generation %}` markers, which most chat templates lack (when they are
missing, `return_assistant_tokens_mask` silently returns all zeros in other trainers). Instead each
assistant turn is located by rendering the conversation up to it:

    prefix = render(messages[:i], add_generation_prompt=True)   # ends with the assistant header
    upto   = render(messages[:i + 1])                            # ends after the turn's end marker

and the characters between the two belong to turn i. Tokens in that span are trained up to and including
the first special token (the end-of-turn marker, `<|im_end|>` for ChatML), so the model learns to stop,
and whatever the template puts after it (a newline) is not. Templates that rewrite earlier turns when a
later one is added (so `upto` is not a prefix of the full text) fall back to finding the content itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from transformers import PreTrainedTokenizerBase

from tunery.data.chat import ChatExample
from tunery.data.tools import with_tools
from tunery.errors import TuneryError


@dataclass
class TokenizedChat:
    line: int
    input_ids: list[int]
    label_mask: list[bool]  # True where the token is trained (assistant content and its end-of-turn token)
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        return sum(self.label_mask)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    text = tokenizer.apply_chat_template(
        messages, tools=cast(Any, tools), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert isinstance(text, str)
    return text


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, example: ChatExample
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans of the trained assistant turns."""
    messages, tools = with_tools(tokenizer, example.messages, example.tools)
    weights = [0] * (len(messages) - len(example.messages)) + list(example.weights)  # an added system message
    full = render(tokenizer, messages, tools)
    spans: list[tuple[int, int]] = []
    search_from = 0
    for i, (msg, weight) in enumerate(zip(messages, weights, strict=True)):
        if msg["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], tools, add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1], tools)
        if i and upto.startswith(prefix) and full.startswith(upto) and len(upto) > len(prefix):
            span = (len(prefix), len(upto))
        else:
            start = full.find(msg["content"], search_from) if msg["content"] else -1
            if start < 0:
                raise TuneryError(
                    f"line {example.line}: cannot locate assistant message {i} in the chat template's output; "
                    "this model's template rewrites or drops it"
                )
            span = (start, start + len(msg["content"]))
        search_from = span[1]
        if weight:
            spans.append(span)
    return full, spans


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, example: ChatExample, max_length: int | None = None
) -> TokenizedChat:
    full, spans = assistant_spans(tokenizer, example)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    label_mask = [False] * len(input_ids)
    token = 0
    for span_start, span_end in spans:
        while token < len(input_ids) and offsets[token][0] < span_start:
            token += 1
        inside = []
        while token < len(input_ids) and offsets[token][0] < span_end:
            inside.append(token)
            token += 1
        # Train through the first special token (end of turn), never past it.
        ends = [j for j in inside if input_ids[j] in special]
        if ends:
            inside = [j for j in inside if j <= ends[0]]
        else:
            while inside and not str(tokenizer.decode([input_ids[inside[-1]]])).strip():
                inside.pop()
            if token < len(input_ids) and input_ids[token] in special:
                inside.append(token)  # content-search fallback: the end-of-turn token right after it
        for j in inside:
            label_mask[j] = True
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, label_mask = input_ids[:max_length], label_mask[:max_length]
    return TokenizedChat(example.line, input_ids, label_mask, truncated)


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of a conversation ending with the assistant header, ready for sampling a reply; `tools` as
    training renders them (data/tools.py)."""
    messages, tools = with_tools(tokenizer, messages, tools)
    text = render(tokenizer, messages, tools, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
