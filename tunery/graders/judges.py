"""score_model and label_model on local models: a chat model that answers in JSON, or a reward model.

A chat model (`backend == "chat"`) gets the grader's `input` messages, rendered, with one instruction
appended to the last user message (or as a new user message): reply with `{"result": <number in range>}`
for score_model, or `{"result": "<one of the labels>"}` for label_model. Sampling is greedy unless
`sampling_params` say otherwise, at most 128 new tokens by default. The reply is parsed leniently: the
first JSON object with a "result", else a bare number or label. A reply that gives none scores 0 with
`model_grader_parse_error`; a score outside `range` is clipped to it.

A Tunery reward model (`backend == "reward_model"`, score_model only) scores the rendered conversation:
when `input` ends with an assistant message, that message is the answer; otherwise the sample's
`output_text` is appended as the assistant's answer. Its raw score s (unbounded) becomes
`low + (high - low) * sigmoid(s)`: 0 maps to the middle of `range`.

Models load on first use and stay cached for the process (`clear_cache()` frees them).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from tunery.graders.spec import ModelGrader

_CHAT_MODELS: dict[str, tuple[Any, Any]] = {}
_REWARD_MODELS: dict[str, tuple[Any, Any]] = {}
# One judge at work at a time: the inference worker grades on two threads (one can wait on a python
# grader's sandbox meanwhile), and a model's decoding engine is not for two threads at once.
_MODELS_IN_USE = threading.Lock()
DEFAULT_MAX_NEW_TOKENS = 128
SAMPLE_BATCH = 16


def clear_cache() -> None:
    _CHAT_MODELS.clear()
    _REWARD_MODELS.clear()


def chat_model(name: str) -> tuple[Any, Any]:
    if name not in _CHAT_MODELS:
        from tunery.models.load import load_for_inference

        _CHAT_MODELS[name] = load_for_inference(name, None)
    return _CHAT_MODELS[name]


def reward_model(path: str) -> tuple[Any, Any]:
    if path not in _REWARD_MODELS:
        from tunery.models.heads import load_reward_model

        model, tokenizer, _ = load_reward_model(path)
        model.eval()
        model.requires_grad_(False)
        _REWARD_MODELS[path] = (model, tokenizer)
    return _REWARD_MODELS[path]


def instruction(spec: ModelGrader) -> str:
    if spec.type == "label_model":
        labels = ", ".join(json.dumps(label) for label in spec.labels)
        return f'Reply with only a JSON object {{"result": <label>}}, where <label> is one of: {labels}.'
    lo, hi = spec.range
    return f'Reply with only a JSON object {{"result": <number>}}, where <number> is from {lo:g} to {hi:g}.'


def judge_messages(spec: ModelGrader, rendered: list[dict[str, str]]) -> list[dict[str, str]]:
    """The chat the local model sees: roles a chat template knows, the answer format asked for at the end."""
    messages = [
        {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
        for m in rendered
    ]
    if messages[-1]["role"] == "user":
        messages[-1] = {"role": "user", "content": messages[-1]["content"] + "\n\n" + instruction(spec)}
    else:
        messages.append({"role": "user", "content": instruction(spec)})
    return messages


def parse_score(text: str) -> float | None:
    """The number a judge replied with, or None.

    >>> parse_score('Sure! {"result": 0.75, "steps": []}'), parse_score(" 3 "), parse_score("great")
    (0.75, 3.0, None)
    """
    value = _result(text)
    if value is None:
        value = text.strip()
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def parse_label(text: str, labels: tuple[str, ...]) -> str | None:
    """The label a judge replied with (exact, else ignoring case and surrounding punctuation), or None.

    >>> parse_label('{"result": "yes"}', ("yes", "no")), parse_label("No.", ("yes", "no"))
    ('yes', 'no')
    """
    value = _result(text)
    candidate = value if isinstance(value, str) else text
    if candidate in labels:
        return candidate
    folded = candidate.strip().strip(".!\"'`*").strip().lower()
    for label in labels:
        if label.lower() == folded:
            return label
    return None


def _result(text: str) -> Any:
    """`result` from the first JSON object in `text` that has one."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict) and "result" in value:
            return value["result"]
    return None


def complete(
    spec: ModelGrader,
    conversations: list[list[dict[str, str]]],
    deadline: float | None = None,
    stopped: Callable[[], bool] | None = None,
) -> list[tuple[str, int, int]]:
    """(reply, prompt tokens, completion tokens) for each conversation, sampled in batches; past `deadline`
    (time.monotonic()), or once `stopped()` (the request was given up), the sampling stops with a
    TimeoutError, between two decoding steps."""
    with _MODELS_IN_USE:
        return _complete(spec, conversations, deadline, stopped)


def _complete(
    spec: ModelGrader,
    conversations: list[list[dict[str, str]]],
    deadline: float | None,
    stopped: Callable[[], bool] | None,
) -> list[tuple[str, int, int]]:
    from tunery.data.template import prompt_ids
    from tunery.models.sampling import SamplingParams, check_context, check_context_before_tokenizing, sample

    model, tokenizer = chat_model(spec.model)
    params = SamplingParams(
        max_new_tokens=spec.sampling_params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
        temperature=spec.sampling_params.get("temperature", 0.0),
        top_p=spec.sampling_params.get("top_p", 1.0),
        seed=spec.sampling_params.get("seed"),
    )
    prompts = []
    for conversation in conversations:  # a sample too long for the judge fails its batch (clear error)
        messages = judge_messages(spec, conversation)
        check_context_before_tokenizing(
            model, tokenizer, sum(len(m["content"]) for m in messages), params.max_new_tokens, len(messages)
        )
        prompts.append(prompt_ids(tokenizer, messages))
        check_context(model, len(prompts[-1]), params.max_new_tokens)

    def in_time() -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("the request's time budget ran out while the judge model was answering")
        if stopped is not None and stopped():
            raise TimeoutError("the request was given up while the judge model was answering")

    replies: list[tuple[str, int, int]] = []
    for start in range(0, len(prompts), SAMPLE_BATCH):
        chunk = prompts[start : start + SAMPLE_BATCH]
        in_time()
        for ids, completion in zip(
            chunk, sample(model, tokenizer, chunk, params, on_step=in_time), strict=True
        ):
            replies.append((completion.text, len(ids), len(completion.token_ids)))
    return replies


def reward_scores(
    spec: ModelGrader, conversations: list[list[dict[str, str]]], answers: list[str]
) -> list[float]:
    """Reward-model scores mapped into `spec.range` by a sigmoid, one per conversation."""
    with _MODELS_IN_USE:
        return _reward_scores(spec, conversations, answers)


def _reward_scores(
    spec: ModelGrader, conversations: list[list[dict[str, str]]], answers: list[str]
) -> list[float]:
    from tunery.data.feedback import FeedbackExample, tokenize_feedback
    from tunery.models.heads import score_pairs

    model, tokenizer = reward_model(spec.model)
    pairs = []
    for i, (conversation, answer) in enumerate(zip(conversations, answers, strict=True)):
        messages = [
            {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
            for m in conversation
        ]
        if messages[-1]["role"] == "assistant":
            prompt, reply = messages[:-1], messages[-1]["content"]
        else:
            prompt, reply = messages, answer
        example = FeedbackExample(i, prompt, [{"role": "assistant", "content": reply or " "}])
        pairs.append(tokenize_feedback(tokenizer, example, 2048)[0])
    lo, hi = spec.range
    return [lo + (hi - lo) / (1.0 + math.exp(-chosen)) for chosen, _ in score_pairs(model, pairs)]
