"""Fuzzing as a test: schemathesis writes requests from the service's own OpenAPI schema (/v1/openapi.json)
and Hypothesis sends them to the app in process (no sockets, no network), with a valid key for a project.

What is fuzzed: every operation in the schema, OpenAI's API under /v1 and the web app's under /tunery/v1,
once with an admin's key and once with a labeller's; and multipart uploads, which the schema leaves out.
Requests are valid and invalid for the schema (schemathesis' positive and negative modes), and about half
name real objects: each app first gets files, a succeeded job (its model and checkpoints), a feedback queue
with items, a comparison, a stored completion and a labeller, and ids in paths and bodies are swapped for
theirs (other fields for good values: messages, graders), so requests get past "not found" to the code
behind it. Training and inference are fakes: the fake CLI trains the one seeded job, no other job starts.

The checks, on every response: no 5xx (an exception in the app fails the test with its traceback); every
error is OpenAI's error object `{"error": {"message", "type", "param", "code"}}`; and a labeller's key
gets no 2xx outside labelling.

Budget: TUNERY_FUZZ_EXAMPLES requests per operation and key, 8 by default (~800 requests, ~25 s on two
cores), always with seed 0, so `make test` sends the same requests every time. Longer runs draw a new seed
(TUNERY_FUZZ_SEED sets one; a failure names it, and prints the request as a curl command):

    make fuzz                                                  # 500 per operation: ~7 minutes
    TUNERY_FUZZ_EXAMPLES=200 pytest tests/server/test_fuzz.py -s    # -s: the count of requests sent

Hypothesis' example database is off and its caches go to a temporary directory, so nothing is written
into the checkout; schemathesis writes no report (its reports and cache belong to its CLI, not used here).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.configuration
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi

from tests.server.conftest import Api, chat_lines, fake_settings, jsonl
from tunery.errors import TuneryError
from tunery.graders.spec import parse_grader
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.errors import APIError
from tunery.server.store import Store

DEFAULT_EXAMPLES = 8
EXAMPLES = int(os.environ.get("TUNERY_FUZZ_EXAMPLES") or DEFAULT_EXAMPLES)
SEED = int(
    os.environ.get("TUNERY_FUZZ_SEED") or (0 if EXAMPLES == DEFAULT_EXAMPLES else random.getrandbits(32))
)
# what a labeller's key may call (deps.AnyRole); every other operation must refuse it
LABELLING = {
    "GET /tunery/v1/me",
    "GET /tunery/v1/feedback/queues",
    "GET /tunery/v1/feedback/queues/{queue_id}",
    "GET /tunery/v1/feedback/queues/{queue_id}/next",
    "GET /tunery/v1/feedback/queues/{queue_id}/progress",
    "GET /tunery/v1/feedback/items/{item_id}",
    "POST /tunery/v1/feedback/items/{item_id}/labels",
}
PROMPTS = [{"messages": [{"role": "user", "content": f"Question {i}?"}]} for i in range(3)]
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
# good values for fields by name, besides the seeded objects' ids: a request with them gets further
GOOD = {
    "messages": [
        PROMPTS[0]["messages"],
        [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
    ],
    "grader": [
        EXACT,
        {
            "type": "score_model",
            "name": "judge",
            "model": "tiny-random",
            "input": [{"role": "user", "content": "x"}],
        },
        {"type": "multi", "name": "m", "graders": {"a": EXACT}, "calculate_output": "2 * a"},
        {
            "type": "python",
            "name": "len",
            "source": "def grade(sample, item):\n    return len(sample['output_text'])\n",
        },
    ],
}


# --- the fake inference worker ---------------------------------------------------------------------------


class FakeInference:
    """Stands in for the inference worker: answers every chat at once ("Hi there", in two deltas when
    streamed); graders are parsed for real (a bad one is the worker's 400) and score 1."""

    async def call(self, request: dict[str, Any], project: str = "") -> dict[str, Any]:
        return await anext(r["result"] async for r in self.stream(request, project) if r["event"] == "done")

    async def stream(self, request: dict[str, Any], project: str = "") -> AsyncIterator[dict[str, Any]]:
        if request["op"] == "grade":
            yield {"event": "done", "result": grade(request)}
            return
        choices = []
        for index in range(request["n"]):
            for text in ("Hi ", "there"):
                yield {"event": "delta", "index": index, "text": text}
            choices.append({"index": index, "text": "Hi there", "finish_reason": "stop", "logprobs": None})
        yield {"event": "done", "result": {"choices": choices, "prompt_tokens": 5, "completion_tokens": 2}}

    async def close(self) -> None:
        pass


def grade(request: dict[str, Any]) -> dict[str, Any]:
    try:
        grader = parse_grader(request["grader"])
    except TuneryError as exc:
        raise APIError(400, str(exc), "grader", "invalid_grader") from None
    if request.get("validate_only"):
        return {}
    metadata = {"name": grader.name, "type": grader.type, "errors": {}, "execution_time": 0.0}
    return {"reward": 1.0, "metadata": metadata, "sub_rewards": {}, "model_grader_token_usage_per_model": {}}


# --- the app, its objects and the schema -----------------------------------------------------------------


@dataclass
class Fuzz:
    """One app under fuzzing: its schema, the key sent, and the statuses it answered each operation."""

    schema: schemathesis.BaseSchema
    app: FastAPI
    role: str
    key: str
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)

    def summary(self) -> str:
        by_status = Counter[int]()
        for (_, status), n in self.statuses.items():
            by_status[status] += n
        shown = ", ".join(f"{n}x {status}" for status, n in sorted(by_status.items()))
        return f"{by_status.total()} requests to {len({o for o, _ in self.statuses})} operations: {shown}"


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hypothesis caches (constants, unicode tables) go to a temporary directory, not ./.hypothesis."""
    hypothesis.configuration.set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    hypothesis.configuration.set_hypothesis_home_dir(None)


@pytest.fixture(params=["admin", "labeller"])
def fuzz(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fuzz]:
    """A new app for each key's role, populated; schemathesis starts it (its lifespan) and this stops it."""
    settings = fake_settings(tmp_path / "service", grader_timeout=5.0)
    store = Store(settings.database_url)
    admin = create_key(store, "acme")[1]
    store.close()
    app = create_app(settings, run_scheduler=False)
    app.state.tunery.inference = FakeInference()
    # an explicit (default) config: none is looked for in a schemathesis.toml
    schema = schemathesis.openapi.from_asgi("/v1/openapi.json", app, config=schemathesis.Config())
    try:
        with asgi.get_client(app) as client:
            known, labeller = populate(client, app, admin)
        swap_in(schema, known)
        yield Fuzz(schema, app, request.param, admin if request.param == "admin" else labeller)
    finally:
        asgi.shutdown_lifespans()


def populate(client: Any, app: FastAPI, key: str) -> tuple[dict[str, list[Any]], str]:
    """Real objects of every kind in the `acme` project: (their ids, and GOOD values, by the names of the
    fields that take them; a labeller's key)."""
    headers = {"Authorization": f"Bearer {key}"}

    def ok(method: str, path: str, **kw: Any) -> dict[str, Any]:
        r = client.request(method, path, headers=headers, **kw)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def upload(content: bytes, name: str) -> str:
        return str(
            ok("POST", "/v1/files", files={"file": (name, content)}, data={"purpose": "fine-tune"})["id"]
        )

    training, prompts = upload(jsonl(chat_lines(10)), "train.jsonl"), upload(jsonl(PROMPTS), "prompts.jsonl")
    scheduler = app.state.tunery.scheduler  # runs the fake CLI for this one job, then stops for good
    scheduler.start()
    job = ok("POST", "/v1/fine_tuning/jobs", json={"model": "tiny-random", "training_file": training})
    deadline = time.monotonic() + 60
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
        job = ok("GET", f"/v1/fine_tuning/jobs/{job['id']}")
    scheduler.stop()
    assert job["status"] == "succeeded", job
    checkpoints = ok("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")["data"]
    models = ["tiny-random", "smollm2-135m-instruct", job["fine_tuned_model"]]
    models += [c["fine_tuned_model_checkpoint"] for c in checkpoints[:1]]

    queue = ok("POST", "/tunery/v1/feedback/queues", json={"name": "imported"})["id"]
    items = [{"prompt": f"Question {i}?", "answers": ["Yes.", "No."]} for i in range(3)]
    ok("POST", f"/tunery/v1/feedback/queues/{queue}/items", json={"items": items})
    item_ids = [i["id"] for i in ok("GET", f"/tunery/v1/feedback/queues/{queue}/items")["data"]]
    comparison = ok("POST", "/tunery/v1/comparisons", json={"job": job["id"]})["id"]
    completion = ok(
        "POST",
        "/v1/chat/completions",
        json={"model": "tiny-random", "messages": PROMPTS[0]["messages"], "store": True},
    )["id"]
    labeller = ok("POST", "/tunery/v1/labellers", json={"name": "Ann"})
    files = [training, prompts]
    ids = {
        "file_id": files,
        "training_file": files,
        "validation_file": files,
        "prompts_file": files,
        "job_id": [job["id"]],
        "job": [job["id"]],
        "model_id": models,
        "model": models,
        "model_a": models,
        "model_b": models,
        "candidate": models,
        "baseline": models,
        "train_model": models,
        "queue_id": [queue, comparison],
        "item_id": item_ids,
        "comparison_id": [comparison],
        "completion_id": [completion],
        "key_id": [labeller["id"]],
    }
    return GOOD | ids, str(labeller["key"])


def swap_in(schema: schemathesis.BaseSchema, known: dict[str, list[Any]]) -> None:
    """Swap generated path parameters and top-level JSON fields for `known` values about half the time."""

    def swapped(values: Any) -> st.SearchStrategy[Any]:
        if not isinstance(values, dict):  # a negative case's body may be any JSON, or missing
            return st.just(values)
        return st.fixed_dictionaries(
            {k: st.sampled_from([v, *known[k]]) if k in known else st.just(v) for k, v in values.items()}
        )

    @schema.hook
    def flatmap_path_parameters(_context: Any, parameters: Any) -> st.SearchStrategy[Any]:
        return swapped(parameters)

    @schema.hook
    def flatmap_body(_context: Any, body: Any) -> st.SearchStrategy[Any]:
        return swapped(body)


# --- the checks -------------------------------------------------------------------------------------------


def openai_error_shape(_ctx: Any, response: Any, _case: Any) -> None:
    """Every 4xx and 5xx body is OpenAI's error object, nothing more."""
    if response.status_code < 400:
        return
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an error object: {response.text[:300]}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body
    assert error["param"] is None or isinstance(error["param"], str), body
    assert error["code"] is None or isinstance(error["code"], str), body


def labeller_is_refused(_ctx: Any, response: Any, case: Any) -> None:
    """A labeller's key gets no 2xx from an operation outside labelling (the check is on for labellers)."""
    if case.operation.label not in LABELLING:
        assert response.status_code >= 400, (
            f"a labeller got {response.status_code} from {case.operation.label}"
        )


def test_fuzz(fuzz: Fuzz, subtests: pytest.Subtests, caplog: pytest.LogCaptureFixture) -> None:
    # a crash fails its subtest with its traceback; the app logging it at every shrinking step would bury it
    caplog.set_level(logging.CRITICAL, logger="tunery.server")
    operations = [result.ok() for result in fuzz.schema.get_all_operations()]
    operations.sort(key=lambda o: o.method == "delete")  # last: the seeded objects are gone after them
    for operation in operations:
        with subtests.test(operation.label, seed=SEED):
            fuzz_operation(operation, fuzz)
        if operation.label == "POST /v1/files":  # its multipart body is not in the schema
            with subtests.test("POST /v1/files (multipart)", seed=SEED):
                fuzz_uploads(fuzz)
    # every operation was called, and the key worked (401s only would test nothing past the middleware)
    assert {o.label for o in operations} <= {label for label, _ in fuzz.statuses}
    assert fuzz.statuses["GET /tunery/v1/me", 200] > 0
    print(f"\nfuzz ({fuzz.role}, seed {SEED}): {fuzz.summary()}")


def fuzz_operation(operation: Any, fuzz: Fuzz) -> None:
    checks = [not_a_server_error, openai_error_shape]
    if fuzz.role == "labeller":
        checks.append(labeller_is_refused)
    cases = st.one_of(
        operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    )

    @hypothesis.seed(SEED)
    @hypothesis.settings(
        max_examples=EXAMPLES, database=None, deadline=None, suppress_health_check=list(HealthCheck)
    )
    @hypothesis.given(cases)
    def send(case: Any) -> None:
        response = case.call(headers={"Authorization": f"Bearer {fuzz.key}"})
        fuzz.statuses[operation.label, response.status_code] += 1
        case.validate_response(response, checks=checks)

    send()


def fuzz_uploads(fuzz: Fuzz) -> None:
    """Multipart uploads, which the schema does not describe: any file name and content, and the form's
    fields with good values, any text, or numbers in any script's digits."""
    text = st.text(max_size=40)
    digits = st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=8)
    form = st.fixed_dictionaries(
        {"purpose": st.sampled_from(["fine-tune", "batch"]) | text},
        optional={
            "expires_after[seconds]": st.sampled_from(["3600", "86400"]) | text | digits,
            "expires_after[anchor]": st.just("created_at") | text,
        },
    )
    content = st.binary(max_size=2000) | st.lists(st.dictionaries(text, text), max_size=5).map(jsonl)

    @hypothesis.seed(SEED)
    @hypothesis.settings(
        max_examples=EXAMPLES, database=None, deadline=None, suppress_health_check=list(HealthCheck)
    )
    @hypothesis.given(st.sampled_from(["train.jsonl", "notes.txt"]) | text, content, form)
    def send(filename: str, content: bytes, fields: dict[str, str]) -> None:
        with asgi.get_client(fuzz.app) as client:
            response = client.post(
                "/v1/files",
                files={"file": (filename, content)},
                data=fields,
                headers={"Authorization": f"Bearer {fuzz.key}"},
            )
        fuzz.statuses["POST /v1/files (multipart)", response.status_code] += 1
        assert response.status_code < 500, response.text
        openai_error_shape(None, response, None)
        if fuzz.role == "labeller":
            assert response.status_code == 403, response.text

    send()


# --- what the fuzzing found: each the exact request, now a 4xx ----------------------------------------------


def error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return dict(response.json()["error"])


def test_a_metrics_cursor_past_the_databases_integers_is_a_400(api: Api) -> None:
    job = api.create_job()["id"]
    metrics = f"/tunery/v1/fine_tuning/jobs/{job}/metrics"
    # was a 500: OverflowError: Python int too large to convert to SQLite INTEGER
    r = api.client.get(metrics, params={"after": 2**63}, headers=api.headers)
    assert error(r, 400)["param"] == "after"
    r = api.client.get(metrics, params={"after": 2**63 - 1}, headers=api.headers)
    assert r.status_code == 200 and r.json()["data"] == []


def test_a_comparisons_numbers_are_checked_as_its_queues_are(api: Api) -> None:
    prompts = api.upload(jsonl(PROMPTS), "prompts.jsonl")
    # the fuzzer's request: was a 500 (pydantic's ValidationError for QueueCreate, made inside the route)
    body = {
        "baseline": "admin",
        "candidate": "*",
        "instructions": "*",
        "job": None,
        "labels_per_item": 1,
        "max_prompts": 10000,
        "max_tokens": 4097,
        "name": "0",
        "prompts_file": prompts,
        "temperature": 1e-05,
    }
    r = api.client.post("/tunery/v1/comparisons", json=body, headers=api.headers)
    assert error(r, 400)["param"] == "max_tokens"
    # and, as a queue's, its numbers refuse booleans (True was read as 1)
    for name in ("labels_per_item", "max_prompts", "max_tokens", "temperature"):
        r = api.client.post(
            "/tunery/v1/comparisons", json=body | {"max_tokens": 8, name: True}, headers=api.headers
        )
        assert error(r, 400)["param"] == name


def test_a_content_length_in_another_scripts_digits_is_not_a_crash(api: Api) -> None:
    # found reading the middleware while fuzzing (schemathesis sends no Content-Length of its own): "³"
    # passes str.isdigit() and int() refused it, a 500 before any route. uvicorn refuses such a header
    # itself; an ASGI server that passes it on now gets the body read and capped as usual.
    headers = api.headers | {"content-type": "application/json", "content-length": b"\xb3"}
    r = api.client.post("/v1/moderations", content=b'{"input": "hi"}', headers=headers)
    assert r.status_code == 200, r.text


# Found by the fuzzer too: an expiry in another script's digits, a cursor past the database's integers.


def test_an_upload_expiry_in_another_scripts_digits_is_a_400(api: Api) -> None:
    r = api.client.post(
        "/v1/files",
        files={"file": ("train.jsonl", b"{}\n")},
        data={"purpose": "fine-tune", "expires_after[seconds]": "፩"},
        headers=api.headers,
    )
    assert error(r, 400)["param"] == "expires_after.seconds"


def test_a_queue_items_cursor_past_the_databases_integers_is_a_400(api: Api) -> None:
    r = api.client.post("/tunery/v1/feedback/queues", json={"name": "imported"}, headers=api.headers)
    queue = r.json()["id"]
    r = api.client.get(
        f"/tunery/v1/feedback/queues/{queue}/items", params={"after": 2**63, "limit": 1}, headers=api.headers
    )
    assert error(r, 400)["param"] == "after"
