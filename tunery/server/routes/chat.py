"""Chat completions with base models, fine-tuned models and checkpoints, proxied to the inference worker;
`stream: true` answers with server-sent events as OpenAI's client reads them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from tunery.server.auth import Caller
from tunery.server.catalog import ResolvedModel, resolve
from tunery.server.deps import AppState, Auth, State
from tunery.server.errors import APIError, bad_request
from tunery.server.schemas import ChatRequest
from tunery.server.store import new_id, now

router = APIRouter()

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
FINGERPRINT = "fp_tunery"


def _text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text"):
                raise bad_request(
                    "Only text content parts are supported.", f"{param}[{i}].type", "invalid_value"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise bad_request("Message content must be a string or a list of text parts.", param, "invalid_type")


def normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(
                f"Invalid value for 'role': {role!r}; use one of {', '.join(ROLES)}.",
                f"messages[{i}].role",
                "invalid_value",
            )
        # chat templates know system, not OpenAI's newer developer role
        out.append(
            {
                "role": "system" if role == "developer" else str(role),
                "content": _text(message.get("content"), f"messages[{i}].content"),
            }
        )
    return out


def _unsupported(body: ChatRequest) -> None:
    """Parameters that would change the answer and that Tunery cannot honour are refused, not ignored."""
    if body.tools:
        raise bad_request("Tool calling is not supported by this server.", "tools", "unsupported_parameter")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise bad_request(
            "Only response_format {'type': 'text'} is supported.", "response_format", "unsupported_parameter"
        )
    if body.logit_bias:
        raise bad_request("logit_bias is not supported.", "logit_bias", "unsupported_parameter")
    if body.top_logprobs:
        raise bad_request(
            "top_logprobs is not supported; logprobs=true gives each chosen token's log-probability.",
            "top_logprobs",
            "unsupported_parameter",
        )
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise bad_request(f"{name} is not supported.", name, "unsupported_parameter")


def _resolve(state: AppState, caller: Caller, name: str) -> ResolvedModel:
    with state.store.session() as session:
        return resolve(session, state.settings, caller, name)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest, state: State, caller: Auth
) -> dict[str, Any] | StreamingResponse:
    _unsupported(body)
    settings = state.settings
    messages = normalise_messages(body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_completion_tokens:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise bad_request(
            f"{param} is too large: at most {settings.max_completion_tokens}.", param, "invalid_value"
        )
    model = await to_thread.run_sync(_resolve, state, caller, body.model)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    request = {
        "op": "chat",
        "model": model.local_model,
        "adapter": model.adapter,
        "base_adapter": model.base_adapter,
        "messages": messages,
        "n": body.n or 1,
        "params": {
            "max_new_tokens": max_tokens,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "stop": stop,
            "seed": body.seed,
        },
        "logprobs": bool(body.logprobs),
        "stream": bool(body.stream),
    }
    completion_id = new_id("chatcmpl-")
    if not body.stream:
        result = await state.inference.call(request)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": now(),
            "model": body.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": c["index"],
                    "message": {
                        "role": "assistant",
                        "content": c["text"],
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": {"content": _logprobs(c["logprobs"]), "refusal": None}
                    if c["logprobs"] is not None
                    else None,
                    "finish_reason": c["finish_reason"],
                }
                for c in result["choices"]
            ],
            "usage": _usage(result),
        }
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    replies = state.inference.stream(request)
    # Wait for the worker's first reply before answering 200, so that a model that fails to load is
    # still an error status, not an error inside a stream.
    first = await anext(replies)
    return StreamingResponse(
        _events(first, replies, completion_id, body, include_usage), media_type="text/event-stream"
    )


def _logprobs(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**item, "top_logprobs": []} for item in items]


def _usage(result: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = int(result["prompt_tokens"]), int(result["completion_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


async def _events(
    first: dict[str, Any],
    replies: AsyncIterator[dict[str, Any]],
    completion_id: str,
    body: ChatRequest,
    include_usage: bool,
) -> AsyncIterator[str]:
    created = now()

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    for index in range(body.n or 1):
        yield chunk(
            [
                {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    message: dict[str, Any] | None = first
    try:
        while message is not None:
            if message.get("event") == "delta":
                yield chunk(
                    [
                        {
                            "index": message["index"],
                            "delta": {"content": message["text"]},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            elif message.get("event") == "done":
                result = message["result"]
                for c in result["choices"]:
                    logprobs = (
                        {"content": _logprobs(c["logprobs"]), "refusal": None}
                        if c["logprobs"] is not None
                        else None
                    )
                    yield chunk(
                        [
                            {
                                "index": c["index"],
                                "delta": {},
                                "logprobs": logprobs,
                                "finish_reason": c["finish_reason"],
                            }
                        ]
                    )
                if include_usage:
                    yield chunk([], _usage(result))
                break
            message = await anext(replies, None)
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        await replies.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"
