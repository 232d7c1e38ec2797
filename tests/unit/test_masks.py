"""Loss masks: exactly the assistant turns and their end-of-turn token, whatever the chat template."""

from __future__ import annotations

import pytest

from tunery.data.chat import check_chat_example
from tunery.data.template import tokenize_chat
from tunery.models.load import prepare_tokenizer
from tunery.models.tiny import tiny_tokenizer

LLAMA3_LIKE = (
    "{{ '<|im_start|>' }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_end|>' }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
# Keeps only the latest system message in front, so rendering a prefix is not a prefix of the whole text.
REWRITING = (
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endif %}{% endfor %}{{ 'turns=' + (messages|length|string) + '\n' }}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MULTI = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Refunds?"},
        {"role": "assistant", "content": "Within 30 days."},
    ]
}


def trained_text(tokenizer, chat) -> str:
    return tokenizer.decode([t for t, m in zip(chat.input_ids, chat.label_mask, strict=True) if m])


def trained_runs(chat) -> list[tuple[int, int]]:
    runs, start = [], None
    for j, m in enumerate(chat.label_mask + [False]):
        if m and start is None:
            start = j
        if not m and start is not None:
            runs.append((start, j))
            start = None
    return runs


def example(obj):
    ex, problems = check_chat_example(obj, 1)
    assert ex is not None, problems
    return ex


@pytest.mark.parametrize("template", [None, LLAMA3_LIKE, REWRITING])
def test_multi_turn_trains_each_assistant_turn_and_its_end_token(template: str | None) -> None:
    tokenizer = tiny_tokenizer()
    if template:
        tokenizer.chat_template = template
    chat = tokenize_chat(tokenizer, example(MULTI))
    assert trained_text(tokenizer, chat) == "Hello! How can I help?<|im_end|>Within 30 days.<|im_end|>"
    runs = trained_runs(chat)
    assert len(runs) == 2
    for start, end in runs:
        assert chat.input_ids[end - 1] == tokenizer.eos_token_id  # the model learns to stop
        assert chat.input_ids[start - 1] != tokenizer.eos_token_id  # the header before it is not trained


def test_single_turn_and_smollm2_default_system_prompt() -> None:
    tokenizer = tiny_tokenizer()
    chat = tokenize_chat(tokenizer, example({"messages": MULTI["messages"][1:3]}))
    text = tokenizer.decode(chat.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.")  # injected by the template
    assert trained_text(tokenizer, chat) == "Hello! How can I help?<|im_end|>"


def test_weight_zero_turn_and_prompts_are_never_trained() -> None:
    tokenizer = tiny_tokenizer()
    obj = {"messages": [dict(m) for m in MULTI["messages"]]}
    obj["messages"][2]["weight"] = 0
    chat = tokenize_chat(tokenizer, example(obj))
    assert trained_text(tokenizer, chat) == "Within 30 days.<|im_end|>"


def test_truncation_keeps_the_start() -> None:
    tokenizer = tiny_tokenizer()
    full = tokenize_chat(tokenizer, example(MULTI))
    cut = tokenize_chat(tokenizer, example(MULTI), max_length=len(full.input_ids) - 5)
    assert cut.truncated and cut.input_ids == full.input_ids[: len(cut.input_ids)]
    assert cut.label_mask == full.label_mask[: len(cut.input_ids)]


def test_padding_is_never_eos() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
