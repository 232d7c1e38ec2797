"""Chat completions with base models, fine-tuned models and checkpoints, proxied to the inference worker;
`stream: true` answers with server-sent events as OpenAI's client reads them."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from anyio import CancelScope, to_thread
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tunery.data.tools import ParsedReply, ReplyStream, parse_tool_calls
from tunery.safety.audit import bounded
from tunery.server.auth import Caller
from tunery.server.catalog import ResolvedModel, refuse_reward_model, resolve
from tunery.server.deps import AppState, Auth, State, unless_gone
from tunery.server.errors import APIError, bad_request
from tunery.server.feedback import store_completion
from tunery.server.routes.moderations import content_filter_on, filtered_stream, withhold_flagged
from tunery.server.schemas import ChatRequest, ToolChoiceFunction
from tunery.server.store import new_id, now

router = APIRouter()
log = logging.getLogger("tunery.server")

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


def _tool_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, checked: [{id, type: function, function: {name, arguments}}]."""
    if not isinstance(calls, list) or len(calls) > 128:
        raise bad_request("tool_calls must be a list of at most 128 calls.", param, "invalid_type")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments", ""), str)
        ):
            raise bad_request(
                "Each tool call needs function.name and function.arguments (a JSON string).",
                f"{param}[{i}]",
                "invalid_value",
            )
        out.append(
            {
                "id": str(call.get("id", "")),
                "type": "function",
                "function": {"name": function["name"], "arguments": function.get("arguments", "")},
            }
        )
    return out


def normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
        normalised: dict[str, Any] = {
            "role": "system" if role == "developer" else str(role),
            "content": _text(message.get("content"), f"messages[{i}].content"),
        }
        if role == "assistant" and message.get("tool_calls"):
            normalised["tool_calls"] = _tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")
        out.append(normalised)
    return out


def _unsupported(body: ChatRequest) -> None:
    """Parameters that would change the answer and that Tunery cannot honour are refused, not ignored."""
    if body.tool_choice is not None and not body.tools:
        raise bad_request("tool_choice is only allowed when tools are given.", "tool_choice", "invalid_value")
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceFunction) and choice.function.name not in {
        t.function.name for t in body.tools or []
    }:
        raise bad_request(
            f"tool_choice names {choice.function.name!r}, which is not one of the tools.",
            "tool_choice",
            "invalid_value",
        )
    for i, tool in enumerate(body.tools or []):
        if len(json.dumps(tool.function.parameters)) > MAX_SCHEMA_BYTES:
            raise bad_request(
                f"The function's parameters schema is too large: at most {MAX_SCHEMA_BYTES} bytes.",
                f"tools[{i}].function.parameters",
                "invalid_value",
            )
    kind = (body.response_format or {}).get("type")
    if kind not in (None, "text", "json_object", "json_schema"):
        raise bad_request(
            "response_format type must be text, json_object or json_schema.",
            "response_format.type",
            "invalid_value",
        )
    if kind == "json_schema":
        spec = body.response_format.get("json_schema") if body.response_format else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request(
                "response_format json_schema needs {name, schema: {...}}.",
                "response_format.json_schema",
                "invalid_value",
            )
        if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise bad_request(
                f"The JSON schema is too large: at most {MAX_SCHEMA_BYTES} bytes.",
                "response_format.json_schema.schema",
                "invalid_value",
            )
    if kind in ("json_object", "json_schema") and body.tools and body.tool_choice != "none":
        raise bad_request(
            "A JSON response_format and tools cannot be used together: the answer is either the JSON or a call.",
            "response_format",
            "invalid_value",
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
        model = resolve(session, state.settings, caller, name)
        refuse_reward_model(session, model)  # it scores answers; it cannot write them
        return model


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest, state: State, caller: Auth, http: Request
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
    tooling = ToolUse.of(body)
    request = {
        "op": "chat",
        "model": model.local_model,
        "adapter": model.adapter,
        "base_adapter": model.base_adapter,
        "messages": messages,
        "tools": tooling.tools if tooling else None,
        "grammar": _grammar(body, tooling),
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
    audited = {
        "completion_id": completion_id,
        "model": model.name,
        "store": bool(body.store),
        "metadata": body.metadata,
    } | {k: v for k, v in request.items() if k not in ("op", "adapter", "base_adapter", "model")}
    if not body.stream:
        try:
            result = await unless_gone(http, state.inference.call(request, caller.project_id))
        except BaseException as exc:  # refused (too long, too many at once), failed, or the client left
            with CancelScope(shield=True):
                await _audit(state, caller, "inference.request", _summarised(audited))
                error = exc.body() if isinstance(exc, APIError) else {"error": exc.__class__.__name__}
                await _audit(state, caller, "inference.error", {"completion_id": completion_id} | error)
            raise
        await _audit(state, caller, "inference.request", audited)
        if content_filter_on(settings, body):
            result = await to_thread.run_sync(withhold_flagged, result)
        response = _completion(completion_id, now(), model.name, result, tooling)
        answers = [
            {"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"]}
            for c in result["choices"]
        ]
        await _audit(state, caller, "inference.response", _answer(completion_id, answers, result))
        if body.store:  # kept to be listed (GET /v1/chat/completions) and rated (POST /tunery/v1/ratings)
            texts = [a["text"] or "" for a in answers]
            await store_completion(state, caller, messages, texts, response, body.metadata)
        return response
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    replies = state.inference.stream(request, caller.project_id)
    if content_filter_on(settings, body):  # answers arrive whole, once scored (routes/moderations.py)
        replies = filtered_stream(replies)
    # Wait for the worker's first reply before answering 200, so that a model that fails to load is
    # still an error status, not an error inside a stream.
    try:  # (with the content filter the first reply is the whole answer: the client may leave meanwhile)
        first = await unless_gone(http, anext(replies))
    except BaseException as exc:
        with CancelScope(shield=True):
            await _audit(state, caller, "inference.request", _summarised(audited))
            error = exc.body() if isinstance(exc, APIError) else {"error": exc.__class__.__name__}
            await _audit(state, caller, "inference.error", {"completion_id": completion_id} | error)
        raise
    try:
        await _audit(state, caller, "inference.request", audited)
    except BaseException:
        await replies.aclose()  # type: ignore[attr-defined]  # unrecorded, so not served: the worker stops generating
        raise
    record = functools.partial(_audit, state, caller)
    keep = functools.partial(store_completion, state, caller, messages, metadata=body.metadata)
    return StreamingResponse(
        _events(
            first,
            replies,
            completion_id,
            body,
            model.name,
            include_usage,
            record,
            tooling,
            keep if body.store else None,
        ),
        media_type="text/event-stream",
    )


MAX_SCHEMA_BYTES = 64 * 1024


def _grammar(body: ChatRequest, tooling: ToolUse | None) -> dict[str, Any] | None:
    """What the answer is decoded in (models/structured.py): a forced tool call, or the JSON asked for."""
    if tooling is not None and tooling.forced:
        return {"kind": "tool_call", "tools": tooling.tools, "names": tooling.forced}
    kind = (body.response_format or {}).get("type")
    if kind == "json_schema":
        return {"kind": "json", "schema": body.response_format["json_schema"]["schema"]}  # type: ignore[index]
    if kind == "json_object":
        return {"kind": "json", "schema": None}
    return None


@dataclass
class ToolUse:
    """A request's tools, when the model may call them (`tool_choice` is not "none"). A forced call is
    decoded in a grammar of the named functions' calls, their arguments in each one's parameters schema."""

    tools: list[dict[str, Any]]
    names: set[str]
    forced: list[str]  # `required` or a named function: the answer is one call of these (a grammar)
    parallel: bool
    # each answer parsed once: its calls' ids, streamed and then stored, must be the same ids
    parsed: dict[tuple[int, str], ParsedReply] = field(default_factory=dict)

    @classmethod
    def of(cls, body: ChatRequest) -> ToolUse | None:
        if not body.tools or body.tool_choice == "none":
            return None
        names = [t.function.name for t in body.tools]
        if isinstance(body.tool_choice, ToolChoiceFunction):
            forced = [body.tool_choice.function.name]
        else:
            forced = names if body.tool_choice == "required" else []
        return cls(
            tools=[t.model_dump(exclude_none=True) for t in body.tools],
            names=set(names),
            forced=forced,
            parallel=body.parallel_tool_calls is not False,
        )

    def parse(self, text: str, index: int = 0) -> ParsedReply:
        """Choice `index`'s answer `text`, read once (two choices may write the same text)."""
        if (index, text) in self.parsed:
            return self.parsed[index, text]
        parsed = self.parsed[index, text] = parse_tool_calls(text, self.names)
        if not self.parallel:
            parsed.tool_calls = parsed.tool_calls[:1]
        return parsed


def _completion(
    completion_id: str, created: int, model: str, result: dict[str, Any], tooling: ToolUse | None
) -> dict[str, Any]:
    """The chat.completion object of a worker's `result`: the answer to a request, and what a stored
    completion returns later (the same object, streamed or not)."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [
            {
                "index": c["index"],
                "message": _message(c["text"], c["index"], tooling),
                "logprobs": {"content": _logprobs(c["logprobs"]), "refusal": None}
                if c["logprobs"] is not None
                else None,
                "finish_reason": _finish(c, tooling),
            }
            for c in result["choices"]
        ],
        "usage": _usage(result),
    }


def _message(text: str, index: int, tooling: ToolUse | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    if tooling is not None:
        parsed = tooling.parse(text, index)
        if parsed.tool_calls:
            message["content"] = parsed.content
            message["tool_calls"] = parsed.tool_calls
    return message


def _finish(choice: dict[str, Any], tooling: ToolUse | None) -> str:
    if tooling is None or choice["finish_reason"] != "stop":
        return str(choice["finish_reason"])
    if tooling.parse(choice["text"], choice["index"]).tool_calls:
        return "tool_calls"
    return str(choice["finish_reason"])


def _summarised(audited: dict[str, Any]) -> dict[str, Any]:
    """A request's audit record without its text: what a request refused or abandoned before the worker
    took it is recorded as. The messages, tools and schema become their size and SHA-256, so a tenant cannot
    fill the log with megabytes that are refused at once; a request the worker runs (its prompt within a
    model's context) is recorded whole."""
    return bounded(audited, dict.fromkeys(("messages", "tools", "grammar"), 0))


async def _audit(state: AppState, caller: Caller, kind: str, payload: dict[str, Any]) -> None:
    """Append to the project's audit log from a worker thread, so the event loop never waits on the disk
    (with `--audit-fsync` a record waits for a disk sync). A record that cannot be written fails the
    request: the service answers nothing it has not recorded."""
    if state.audit is not None:
        await to_thread.run_sync(state.audit.append, caller.project_name, kind, payload, caller.key_id)


def _answer(completion_id: str, answers: list[dict[str, Any]], result: dict[str, Any]) -> dict[str, Any]:
    usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"]}
    return {"completion_id": completion_id, "choices": answers, "usage": usage}


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


def _tool_delta(index: int, deltas: list[dict[str, Any]]) -> dict[str, Any]:
    return {"index": index, "delta": {"tool_calls": deltas}, "logprobs": None, "finish_reason": None}


def _calls_sent(reply: ReplyStream | None) -> dict[str, Any]:
    """The tool calls a broken stream had sent, for the audit log."""
    if reply is None or not reply.calls.ids:
        return {}
    calls = reply.calls
    sent = zip(calls.ids, calls.names_sent, calls.arguments, strict=True)
    return {"tool_calls": [{"id": i, "name": n, "arguments": a} for i, n, a in sent]}


async def _events(
    first: dict[str, Any],
    replies: AsyncIterator[dict[str, Any]],
    completion_id: str,
    body: ChatRequest,
    model_name: str,  # the model that answers (`current` is the project's current model's name)
    include_usage: bool,
    record: Callable[[str, dict[str, Any]], Awaitable[None]],
    tooling: ToolUse | None = None,
    keep: Callable[[list[str], dict[str, Any]], Awaitable[None]] | None = None,
) -> AsyncIterator[str]:
    """The answer as server-sent events; recorded in the audit log when it ends (or breaks), and with
    `keep` (`store: true`) the whole chat.completion is stored once complete."""
    created = now()
    kept: tuple[list[str], dict[str, Any]] | None = None
    # with tools, text is sent up to where a call may begin, then the calls as they come; the rest (text
    # after a call, calls in bare JSON) when the answer ends (tunery/data/tools.py: ReplyStream)
    replying: dict[int, ReplyStream] = {}
    streamed: dict[int, list[str]] = {}  # what the client was sent, for the audit log if the stream breaks
    outcome: tuple[str, dict[str, Any]] | None = None

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
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
                index, piece = message["index"], message["text"]
                deltas: list[dict[str, Any]] = []
                if tooling is not None:
                    reply = replying.setdefault(index, ReplyStream(tooling.names, tooling.parallel))
                    piece, deltas = reply.feed(piece)
                streamed.setdefault(index, []).append(piece)
                if piece:
                    yield chunk(
                        [
                            {
                                "index": index,
                                "delta": {"content": piece},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                if deltas:
                    yield chunk([_tool_delta(index, deltas)])
            elif message.get("event") == "done":
                result = message["result"]
                answers = [
                    {"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"]}
                    for c in result["choices"]
                ]
                outcome = ("inference.response", _answer(completion_id, answers, result))
                ending: dict[int, tuple[str, list[dict[str, Any]]]] = {}  # before the stored answer: its ids
                for c in result["choices"] if tooling is not None else []:
                    assert tooling is not None
                    reply = replying.get(c["index"]) or ReplyStream(tooling.names, tooling.parallel)
                    ending[c["index"]] = reply.finish(c["text"], tooling.parse(c["text"], c["index"]))
                texts_written = [c["text"] or "" for c in result["choices"]]
                kept = (texts_written, _completion(completion_id, created, model_name, result, tooling))
                for c in result["choices"]:
                    finish = c["finish_reason"]
                    if tooling is not None:
                        rest, deltas = ending[c["index"]]
                        if tooling.parse(c["text"], c["index"]).tool_calls:
                            finish = "tool_calls" if finish == "stop" else finish
                        if rest:
                            streamed.setdefault(c["index"], []).append(rest)
                            yield chunk(
                                [
                                    {
                                        "index": c["index"],
                                        "delta": {"content": rest},
                                        "logprobs": None,
                                        "finish_reason": None,
                                    }
                                ]
                            )
                        if deltas:
                            yield chunk([_tool_delta(c["index"], deltas)])
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
                                "finish_reason": finish,
                            }
                        ]
                    )
                if include_usage:
                    yield chunk([], _usage(result))
                break
            message = await anext(replies, None)
    except APIError as exc:
        outcome = ("inference.error", {"completion_id": completion_id} | exc.body())
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        if outcome is None:
            error = {
                "message": "the stream ended before the answer did (the client left, or the server failed)"
            }
            outcome = ("inference.error", {"completion_id": completion_id, "error": error})
        if outcome[0] == "inference.error":
            outcome[1]["partial_choices"] = [
                {"index": i, "text": "".join(t)} | _calls_sent(replying.get(i))
                for i, t in sorted(streamed.items())
            ]
        try:
            with CancelScope(shield=True):  # a disconnect cancels the stream; the record is written anyway
                await record(*outcome)
        except Exception:  # the answer has gone out; a failed record must not break its end
            log.exception("audit log: could not record the end of %s", completion_id)
        if keep is not None and kept is not None:  # `store: true`, and the answer was whole
            try:
                with CancelScope(shield=True):
                    await keep(*kept)
            except Exception:
                log.exception("could not store the completion %s (store: true)", completion_id)
        await replies.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"
