"""The inference worker: a long-lived process that holds models and answers chat completions and model
graders for the API process, which never imports torch.

    python -m tunery.server.inference [--cache 2]

Protocol: one JSON object per line, requests on stdin, replies on stdout (the API process starts the
worker and holds both pipes; nothing else can reach it). The worker prints `{"event": "ready"}` once,
then answers requests:

    {"id": 7, "project": "proj_..", "op": "chat", "model": "tiny-random", "adapter": DIR|null,
     "base_adapter": DIR|null, "messages": [...], "n": 1,
     "params": {"max_new_tokens", "temperature", "top_p", "stop", "seed"}, "logprobs": false, "stream": true}
        -> {"id": 7, "event": "delta", "index": 0, "text": "Hel"} ...          (stream only)
        -> {"id": 7, "event": "done", "result": {"choices": [{"index", "text", "finish_reason",
            "logprobs": [{"token", "logprob", "bytes"}] | null}], "prompt_tokens", "completion_tokens"}}
    {"id": 8, "project": "proj_..", "op": "grade", "grader": {...}, "model_sample": "...", "item": {...},
     "validate_only": false}
        -> {"id": 8, "event": "done", "result": <OpenAI's grader run response>}
    {"op": "cancel", "target": 7}       stop request 7 at its next token (the client went away)

Chat requests and grader requests wait in separate queues, so a grader (which may run python code for up
to its timeout, shared by all its sub-graders) never holds up chat; GRADE_SLOTS grader requests of
different projects run at once. Within a queue, projects take turns: a project's backlog delays
another project's next request by at most one request of its own. Chat requests are answered CHAT_SLOTS
at a time (a project holds at most half of them), taking one decoding step each in turn: a long answer
(n=16, thousands of tokens) slows a short one down, it does not make it wait until it is done.
A prompt that does not fit the model's context with the tokens asked for is refused before any work
(400 `context_length_exceeded`). Any failure is
`{"id": N, "event": "error", "status": 400|500, "message": "...", "param": ..., "code": ...}`.
Models load on first use and the `--cache` most recently used models stay loaded (base models, and the
merged copies below). A LoRA adapter is
served beside its base model's weights: the decoding engine applies its low-rank factors (a few MB) on the
shared base, so many adapters of one base cost one copy of it; the `--adapters` most recently used stay.
An adapter the engine cannot apply that way (an architecture it does not cover, DoRA, modules saved whole),
or every adapter with `--adapters 0`, is merged into a copy of the base model of its own, which counts as
a model: decoding is faster that way (bench/adapters.py), but each adapter costs a whole model's memory.

An inference replica on a Ray cluster (`tunery serve --executor ray --inference-replicas N`) speaks the
same protocol over TCP instead of pipes:

    python -m tunery.server.inference --cache 2 --listen --token-file DATA_DIR/inference/token \
        --announce DATA_DIR/inference/<name>.json --route-to HEAD

It listens on a free port of the address that routes to HEAD, writes {"host", "port", "pid"} to the
announce file (atomically; the data directory is on storage the API sees), and takes one connection
whose first line is the token (the file is the service owner's alone): anything else is closed unread.
It exits when that connection closes, or when none came within LISTEN_SECONDS.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tunery.server.fair import FairQueue
from tunery.server.settings import Settings

log = logging.getLogger("tunery.inference")


LISTEN_SECONDS = 600.0  # an inference replica no API connected to within this long exits
TOKEN_SECONDS = 10.0  # a connection has this long to send the token line
CHAT_SLOTS = 4  # chat requests decoding at once, step by step in turn (each holds its KV cache)
# grader requests at once, one a project: while one waits on a python grader's sandbox, another project's
# model grader runs (judges take their models one request at a time)
GRADE_SLOTS = 2
# an adapter whose factors take more than 1/FACTORS_SHARE of its base model's weights gets a merged copy
FACTORS_SHARE = 4


class Cancelled(Exception):
    pass


class Turns:
    """One decoding step at a time across the chat threads, in the order they asked: a thread passes the
    turn on after each step and queues behind the threads already waiting. Alone, it keeps the turn."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._waiting: deque[int] = deque()
        self._holder: int | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._changed:
            self._waiting.append(me)
            while self._holder is not None or self._waiting[0] != me:
                self._changed.wait()
            self._waiting.popleft()
            self._holder = me

    def release(self) -> None:
        with self._changed:
            self._holder = None
            self._changed.notify_all()

    def pass_on(self) -> None:
        """Between two steps: let a waiting thread take its step first."""
        with self._changed:
            if not self._waiting:
                return
        self.release()
        self.acquire()


class Worker:
    def __init__(
        self,
        out: IO[str],
        cache_size: int = Settings.inference_cache,
        requests: IO[str] | None = None,
        adapter_cache: int = Settings.inference_adapters,
    ) -> None:
        self.out, self.cache_size, self.adapter_cache = out, cache_size, adapter_cache
        self.requests = requests if requests is not None else sys.stdin
        # (model, adapter, base adapter) -> (model, tokenizer): base models (adapter None), and adapters
        # merged into a copy of their own; and adapters served beside their base model's weights
        self.models: OrderedDict[tuple[str, str | None, str | None], tuple[Any, Any]] = OrderedDict()
        self.adapters: OrderedDict[tuple[str, str, str | None], Any] = OrderedDict()
        # why an adapter, or every adapter of a base, gets a merged copy: found once, not at each load
        self.own_copies: OrderedDict[tuple[str, str, str | None], str] = OrderedDict()
        self.no_engine: dict[tuple[str, None, str | None], str] = {}
        self.cancelled: set[int] = set()
        self.chats: FairQueue[dict[str, Any]] = FairQueue(running_per_key=max(1, CHAT_SLOTS // 2))
        self.turns = Turns()
        self.grades: FairQueue[dict[str, Any]] = FairQueue(running_per_key=1)
        self._write_lock = threading.Lock()
        self._load_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self._write_lock:
            self.out.write(json.dumps(message) + "\n")
            self.out.flush()

    def read_stdin(self) -> None:
        for line in self.requests:
            try:
                request = json.loads(line)
            except ValueError:
                continue
            if not isinstance(request, dict):
                continue
            if request.get("op") == "cancel":
                self.cancelled.add(int(request.get("target", -1)))
                continue
            project = str(request.get("project", ""))
            (self.grades if request.get("op") == "grade" else self.chats).put(project, request)
        self.chats.close()  # the API process closed the pipe: finish what is queued, then exit
        self.grades.close()

    def serve(self) -> None:
        threading.Thread(target=self.read_stdin, daemon=True).start()
        workers = [
            threading.Thread(target=self.work, args=(self.grades,), name=f"grades-{k}", daemon=True)
            for k in range(GRADE_SLOTS)
        ]
        workers += [
            threading.Thread(target=self.work, args=(self.chats,), name=f"chat-{k}", daemon=True)
            for k in range(CHAT_SLOTS)
        ]
        for worker in workers:
            worker.start()
        self.send({"event": "ready", "pid": os.getpid()})
        for worker in workers:
            worker.join()

    def work(self, requests: FairQueue[dict[str, Any]]) -> None:
        while (got := requests.get()) is not None:
            project, request = got
            try:
                self.answer(request)
            finally:
                requests.done(project)

    def answer(self, request: dict[str, Any]) -> None:
        request_id = int(request.get("id", -1))
        try:
            if request_id in self.cancelled:
                raise Cancelled
            if request.get("op") == "chat":
                result = self.chat(request_id, request)
            elif request.get("op") == "grade":
                result = self.grade(request_id, request)
            else:
                raise ValueError(f"unknown op {request.get('op')!r}")
            self.send({"id": request_id, "event": "done", "result": result})
        except Cancelled:
            self.send({"id": request_id, "event": "error", "status": 499, "message": "cancelled"})
        except Exception as exc:
            reply = describe(exc)
            if request.get("op") == "grade" and reply["status"] == 400 and reply["param"] is None:
                reply |= {"param": "grader", "code": "invalid_grader"}  # a bad grader, as the API says it
            self.send({"id": request_id, **reply})
        finally:
            self.cancelled.discard(request_id)

    # --- models -----------------------------------------------------------------------------------------

    def load(self, name: str, adapter: str | None, base_adapter: str | None) -> tuple[Any, Any, Any]:
        """(model, tokenizer, LoRA factors to apply beside the model's weights or None)."""
        with self._load_lock:
            if adapter is None or self.adapter_cache < 1 or (name, adapter, base_adapter) in self.models:
                return (*self._load(name, adapter, base_adapter), None)
            key = (name, adapter, base_adapter)
            lora = self.adapters.get(key)
            if lora is None:
                lora = self._beside(key)
                if isinstance(lora, str):
                    return (*self._load(name, adapter, base_adapter), None)
                while len(self.adapters) >= self.adapter_cache:
                    self.adapters.popitem(last=False)
                self.adapters[key] = lora
            self.adapters.move_to_end(key)
            return (*self._load(name, None, base_adapter), lora)

    def _beside(self, key: tuple[str, str, str | None]) -> Any:
        """The adapter's LoRA factors on its base model's decoding engine, or why it gets a merged copy of
        its own instead (remembered, so the base is not loaded again only to find it out)."""
        from tunery.models.decode import decode_model_for, unsupported_reason
        from tunery.models.lora import read_lora

        name, adapter, base_adapter = key
        base_key = (name, None, base_adapter)
        reason = self.own_copies.get(key) or self.no_engine.get(base_key)
        if reason is None:
            updates = read_lora(adapter)
            if isinstance(updates, str):
                reason = updates
            else:
                loaded = base_key in self.models
                model = self._load(*base_key)[0]
                engine = decode_model_for(model)
                factors = engine.adapter(updates) if engine is not None else None
                if engine is None or factors is None:
                    reason = f"the decoding engine does not run this model ({unsupported_reason(model)})"
                    self.no_engine[base_key] = reason
                elif isinstance(factors, str):
                    reason = factors
                else:
                    weights = sum(p.numel() * p.element_size() for p in model.parameters())
                    if factors.nbytes <= weights // FACTORS_SHARE:
                        return factors
                    # (an adapter trained on top of another on top of another ...: the ranks add up)
                    reason = (
                        f"its factors ({factors.nbytes / 2**20:.0f} MB) exceed 1/{FACTORS_SHARE} of the "
                        "model's weights"
                    )
                if not loaded:  # loaded only to find this out
                    self.models.pop(base_key, None)
        log.info("adapter %s gets a merged copy of the base model of its own: %s", adapter, reason)
        self.own_copies[key] = reason
        while len(self.own_copies) > 1024:
            self.own_copies.popitem(last=False)
        return reason

    def _load(self, name: str, adapter: str | None, base_adapter: str | None) -> tuple[Any, Any]:
        key = (name, adapter, base_adapter)
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        while len(self.models) >= max(1, self.cache_size):
            self.models.popitem(last=False)
        if base_adapter is None:
            from tunery.models.load import load_for_inference

            loaded = load_for_inference(name, adapter)
        else:
            loaded = load_stacked(name, base_adapter, adapter)
        from tunery.models.decode import decode_model_for

        decode_model_for(loaded[0])  # built now, under the load lock: two chat threads never build two
        self.models[key] = loaded
        return loaded

    # --- operations -------------------------------------------------------------------------------------

    def chat(self, request_id: int, request: dict[str, Any]) -> dict[str, Any]:
        from tunery.data.template import prompt_ids
        from tunery.models.sampling import (
            SamplingParams,
            check_context,
            check_context_before_tokenizing,
            sample,
        )

        model, tokenizer, lora = self.load(
            request["model"], request.get("adapter"), request.get("base_adapter")
        )
        params = SamplingParams(**request["params"])
        # A prompt too long is refused before anything costly: rendering the template and tokenizing
        # (megabytes take seconds; each message is at least a token of it, even an empty one), then
        # compiling the grammar (a schema's regular expressions can take seconds)
        characters = sum(len(str(m.get("content") or "")) for m in request["messages"])
        check_context_before_tokenizing(
            model, tokenizer, characters, params.max_new_tokens, messages=len(request["messages"])
        )
        prompt = prompt_ids(tokenizer, request["messages"], request.get("tools"))
        check_context(model, len(prompt), params.max_new_tokens)
        params = dataclasses.replace(params, grammar=constraint(model, tokenizer, request.get("grammar")))
        n = int(request.get("n", 1))

        def on_text(index: int, delta: str) -> None:
            if request_id in self.cancelled:
                raise Cancelled
            self.send({"id": request_id, "event": "delta", "index": index, "text": delta})

        def check_cancelled(_index: int, _delta: str) -> None:
            if request_id in self.cancelled:
                raise Cancelled

        with self.turns.held():  # the prefill is one step; then the turn passes on between steps
            completions = sample(
                model,
                tokenizer,
                [prompt] * n,
                params,
                on_text=on_text if request.get("stream") else check_cancelled,
                on_step=self.turns.pass_on,
                adapter=lora,
            )
        choices = []
        for i, c in enumerate(completions):
            logprobs = None
            if request.get("logprobs"):
                logprobs = []
                for token_id, logprob in zip(c.token_ids, c.logprobs, strict=True):
                    text = str(tokenizer.decode([token_id]))
                    logprobs.append({"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))})
            choices.append(
                {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": logprobs}
            )
        return {
            "choices": choices,
            "prompt_tokens": len(prompt),
            "completion_tokens": sum(len(c.token_ids) for c in completions),
        }

    def grade(self, request_id: int, request: dict[str, Any]) -> dict[str, Any]:
        from tunery.graders.run import build_grader, run_response
        from tunery.graders.sandbox import SandboxLimits
        from tunery.graders.spec import parse_grader

        if request.get("validate_only"):
            parse_grader(request["grader"])
            return {}
        timeout = float(request.get("timeout", 120))  # for the whole request: its graders share it
        limits = SandboxLimits(
            timeout=timeout,
            deadline=time.monotonic() + timeout,
            stopped=lambda: request_id in self.cancelled,  # the client left: a judge stops between steps
        )
        grader = build_grader(request["grader"], limits=limits)
        return run_response(grader(request.get("model_sample", ""), request.get("item") or {}), grader)


def load_stacked(name: str, base_adapter: str, adapter: str | None) -> tuple[Any, Any]:
    """A checkpoint of continued training: the adapter it started from merged in, then its own."""
    import torch

    from tunery.models.load import load_model
    from tunery.models.lora import bf16_is_fast, cast_frozen, load_adapter, merge_adapter

    model: Any
    model, tokenizer = load_model(name)
    model = merge_adapter(model, base_adapter)
    if adapter:
        model = load_adapter(model, adapter)
    model.eval()
    model.requires_grad_(False)
    if bf16_is_fast(torch.device("cpu")):
        cast_frozen(model, torch.bfloat16)
    return model, tokenizer


def constraint(model: Any, tokenizer: Any, spec: dict[str, Any] | None) -> Any:
    """The grammar a request's answer is decoded in: a JSON schema (`response_format`), or one call of the
    named functions with arguments in their parameters' schema (a forced tool call)."""
    if not spec:
        return None
    from tunery.models.sampling import stop_token_ids
    from tunery.models.structured import json_grammar, tool_call_grammar

    vocab = int(model.get_input_embeddings().weight.shape[0])
    stops = stop_token_ids(tokenizer, model)
    if spec["kind"] == "tool_call":
        return tool_call_grammar(tokenizer, vocab, stops, spec["tools"], spec["names"])
    return json_grammar(tokenizer, vocab, stops, spec.get("schema"))


def describe(exc: Exception) -> dict[str, Any]:
    from tunery.errors import TuneryError
    from tunery.models.sampling import ContextTooLong
    from tunery.models.structured import InvalidGrammar

    if isinstance(exc, InvalidGrammar):
        return {
            "event": "error",
            "status": 400,
            "message": str(exc),
            "param": exc.param,
            "code": "invalid_value",
        }

    if isinstance(exc, ContextTooLong):
        return {
            "event": "error",
            "status": 400,
            "message": str(exc),
            "param": "messages",
            "code": "context_length_exceeded",
        }
    if isinstance(exc, TuneryError):
        return {"event": "error", "status": 400, "message": str(exc), "param": None}
    traceback.print_exc(file=sys.stderr)
    return {
        "event": "error",
        "status": 500,
        "message": f"inference failed: {exc.__class__.__name__}: {exc}",
        "param": None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunery.server.inference")
    parser.add_argument("--cache", type=int, default=Settings.inference_cache, help="models kept loaded")
    parser.add_argument(
        "--adapters",
        type=int,
        default=Settings.inference_adapters,
        help="adapters kept beside their base models (0: merged copies)",
    )
    parser.add_argument(
        "--listen", action="store_true", help="take one TCP connection instead of stdin/stdout"
    )
    parser.add_argument("--token-file", help="with --listen: the secret the connection must send first")
    parser.add_argument("--announce", help="with --listen: where to write the address listened on")
    parser.add_argument("--route-to", default="127.0.0.1", help="with --listen: listen on the address to it")
    args = parser.parse_args(argv)
    if args.listen:
        return listen(args)
    # The protocol owns the real stdout; anything a library prints goes to stderr (the worker's log).
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from tunery.training.memory import keep_freed_memory

    keep_freed_memory()
    Worker(out, args.cache, adapter_cache=args.adapters).serve()
    return 0


def _first_line(connection: Any, deadline: float) -> bytes:
    """The connection's first line (at most 4 KB), read byte by byte so nothing after it is taken from
    the protocol, within `deadline` in all: a client that trickles bytes is cut off."""
    line = b""
    while len(line) < 4096:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b""
        connection.settimeout(remaining)
        try:
            byte = connection.recv(1)
        except OSError:
            return b""
        if byte in (b"", b"\n"):
            return line.strip() if byte else b""
        line += byte
    return b""


def listen(args: argparse.Namespace) -> int:
    """One connection over TCP, authenticated by the token, then the protocol over it (module docstring)."""
    import hmac
    import socket

    from tunery.training.io import atomic_write_json

    token = Path(args.token_file).read_text(encoding="utf-8").strip()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # no packet is sent
        probe.connect((socket.gethostbyname(args.route_to), 9))
        host = probe.getsockname()[0]
    server = socket.create_server((host, 0))
    atomic_write_json(
        Path(args.announce), {"host": host, "port": server.getsockname()[1], "pid": os.getpid()}
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    deadline = time.monotonic() + LISTEN_SECONDS  # for the API's connection, however many others come
    while True:
        server.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            connection, peer = server.accept()
        except TimeoutError:
            log.info("no connection within %.0f s; exiting", LISTEN_SECONDS)
            return 0
        offered = _first_line(connection, time.monotonic() + TOKEN_SECONDS)
        if offered and hmac.compare_digest(offered, token.encode()):
            break
        log.warning("refused a connection from %s: wrong token", peer[0])
        connection.close()
    reader = connection.makefile("r", encoding="utf-8", newline="\n")
    server.close()
    connection.settimeout(None)
    out = connection.makefile("w", encoding="utf-8", buffering=1, newline="\n")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from tunery.training.memory import keep_freed_memory

    keep_freed_memory()
    Worker(out, args.cache, reader, args.adapters).serve()
    return 0


if __name__ == "__main__":
    from tunery._imports import defer_bitsandbytes, hide_hub_kernels

    defer_bitsandbytes()  # the worker never quantizes: peft would import it for nothing (~1 s of its start)
    hide_hub_kernels()
    raise SystemExit(main())
