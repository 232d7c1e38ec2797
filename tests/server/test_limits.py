"""What a request meets before its route (middleware.py): the key before the body, the body's size and
depth; and the checks of values inside it: numbers within their ranges (never booleans), graders and
prompts files nested too deeply. Every refusal is OpenAI's error object with a 4xx, never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.server.conftest import Api, fake_settings, jsonl
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.errors import APIError
from tunery.server.middleware import MAX_JSON_DEPTH, too_deep
from tunery.server.settings import Settings
from tunery.server.store import Store

CAP = 2**18  # max_request_bytes in these tests (the default is 8 MB)
CHUNK = 1024


class NoWorker:
    """The inference worker's stand-in: a request that gets this far was not refused in time."""

    async def call(self, request: dict[str, Any], project: str = "") -> dict[str, Any]:
        raise APIError(503, "no inference worker in these tests", type="server_error")

    async def stream(self, request: dict[str, Any], project: str = "") -> AsyncIterator[dict[str, Any]]:
        raise APIError(503, "no inference worker in these tests", type="server_error")
        yield {}

    async def close(self) -> None:
        pass


@pytest.fixture
def limited(tmp_path: Path) -> tuple[Settings, str]:
    settings = fake_settings(tmp_path / "service", max_request_bytes=CAP, max_upload_bytes=10**6)
    store = Store(settings.database_url)
    key = create_key(store, "acme")[1]
    store.close()
    return settings, key


def app_for(settings: Settings) -> FastAPI:
    app = create_app(settings, run_scheduler=False)
    app.state.tunery.inference = NoWorker()
    return app


@pytest.fixture
def api(limited: tuple[Settings, str]) -> Iterator[Api]:
    settings, key = limited
    with TestClient(app_for(settings), raise_server_exceptions=False) as client:
        yield Api(client, key)


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def stream_to(app: FastAPI, path: str, headers: dict[str, str], total: int) -> tuple[httpx.Response, int]:
    """POST a body of `total` bytes, chunked (no Content-Length), through the ASGI app; the response and
    how many bytes the server took from the body before it answered."""
    taken = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal taken
        chunk = b"[" * CHUNK
        while taken < total:
            taken += CHUNK
            yield chunk

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tunery") as client:
            return await client.post(path, content=body(), headers=headers)

    return asyncio.run(post()), taken


# --- the key first, then the size --------------------------------------------------------------------------


def test_without_a_key_the_body_is_never_read(limited: tuple[Settings, str]) -> None:
    settings, _ = limited
    settings.max_request_bytes = 8 * 2**20  # the default: a body far past it is still never read
    app = app_for(settings)
    json_headers = {"content-type": "application/json"}
    for path in ("/v1/chat/completions", "/v1/files", "/tunery/v1/feedback/queues"):
        for headers in (json_headers, {**json_headers, "Authorization": "Bearer sk-tunery-wrong"}):
            response, taken = stream_to(app, path, headers, total=20 * 2**20)
            assert taken == 0, (path, taken)
            assert error(response, 401)["code"] in ("missing_api_key", "invalid_api_key")
            assert response.headers["x-request-id"].startswith("req_")
    app.state.tunery.store.close()


def test_a_body_past_the_cap_is_413(limited: tuple[Settings, str], api: Api) -> None:
    settings, key = limited
    # with a length: refused before reading
    r = api.client.post(
        "/v1/chat/completions",
        headers={**api.headers, "content-type": "application/json"},
        content=b" " * (CAP + 1),
    )
    found = error(r, 413)
    assert found["code"] == "request_too_large" and f"the limit is {CAP} bytes" in found["message"]
    # without one: counted while it streams, and cut off at the cap
    app = app_for(settings)
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    response, taken = stream_to(app, "/v1/fine_tuning/jobs", headers, total=2**20)
    assert error(response, 413)["code"] == "request_too_large"
    assert CAP < taken <= CAP + CHUNK
    # an upload's cap is the upload limit plus 64 KiB of form: a form field cannot stream on forever
    body = (
        b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + b"x" * 1_200_000 + b"\r\n--B--\r\n"
    )
    r = api.client.post(
        "/v1/files",
        headers={**api.headers, "content-type": "multipart/form-data; boundary=B"},
        content=iter([body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]),
    )
    assert error(r, 413)["code"] == "file_too_large"
    app.state.tunery.store.close()


def test_uploads_still_stream_past_the_json_cap(api: Api, limited: tuple[Settings, str]) -> None:
    settings, _ = limited
    content = jsonl([{"messages": [{"role": "user", "content": "x" * 500}]}] * 1500)  # ~3x the JSON cap
    assert len(content) > 2 * CAP
    file_id = api.upload(content)
    assert api.client.get(f"/v1/files/{file_id}/content", headers=api.headers).content == content
    for size in (10**6 + 1, 10**6 + 2**17):  # found by the route while it streams; by its length
        r = api.post("/files", files={"file": ("big.jsonl", b"x" * size)}, data={"purpose": "fine-tune"})
        assert error(r, 413) == {
            "message": "File is too large: the limit is 1000000 bytes (1 MB).",
            "type": "invalid_request_error",
            "param": "file",
            "code": "file_too_large",
        }
    assert [p.name for p in settings.files_dir.iterdir()] == [file_id]


def test_public_paths_and_no_docs(api: Api) -> None:
    """/docs and /redoc loaded Swagger UI and ReDoc from a CDN into the web app's origin: gone. The
    schema is still served, without a key."""
    assert error(api.client.get("/docs"), 404) and error(api.client.get("/redoc"), 404)
    assert "/v1/chat/completions" in api.client.get("/v1/openapi.json").json()["paths"]
    assert api.client.get("/").status_code == 200  # the web app's page needs no key
    schema = api.client.get("/v1/openapi.json").json()["components"]["schemas"]
    n_epochs = schema["SupervisedHyperparameters"]["properties"]["n_epochs"]["anyOf"]
    assert {"type": "integer", "minimum": 1, "maximum": 50} in n_epochs  # the range is still published


# --- depth ------------------------------------------------------------------------------------------------


def test_too_deep_counts_arrays_and_objects_not_strings() -> None:
    assert not too_deep(b"[" * 64 + b"]" * 64) and too_deep(b"[" * 65 + b"]" * 65)
    assert not too_deep(json.dumps({"a": "[{" * 1000, "b": '\\"[[[' * 100}).encode())
    assert too_deep(b'{"a": "\\"", "b": ' + b"[" * 65 + b"]" * 65 + b"}")
    assert not too_deep(b"[]" * 100_000)


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_deep_json_is_400_invalid_json_at_every_endpoint(api: Api) -> None:
    headers = {**api.headers, "content-type": "application/json"}
    bodies = {
        "/v1/chat/completions": '{"model": "tiny-random", "messages": [{"role": "user", "content": %s}]}',
        "/v1/fine_tuning/jobs": '{"model": "tiny-random", "training_file": "file-x", "integrations": [%s]}',
        "/v1/fine_tuning/alpha/graders/validate": '{"grader": {"type": "python", "source": %s}}',
        "/v1/moderations": '{"input": %s}',
        "/tunery/v1/feedback/queues": '{"name": %s}',
    }
    for levels in (100_000, MAX_JSON_DEPTH + 1):
        for path, body in bodies.items():
            found = error(api.client.post(path, headers=headers, content=body % deep(levels)), 400)
            assert found["code"] == "invalid_json" and "nested too deeply" in found["message"], path
    # brackets inside strings are text, not depth
    text = deep(1000)
    r = api.post("/fine_tuning/jobs", json={"model": "tiny-random", "training_file": text})
    assert error(r, 400)["param"] == "training_file"


def multi(levels: int) -> dict[str, Any]:
    grader: dict[str, Any] = {"type": "string_check", "input": "a", "reference": "b", "operation": "eq"}
    for _ in range(levels):
        grader = {"type": "multi", "graders": {"a": grader}, "calculate_output": "a"}
    return grader


def test_nested_multi_graders_are_400(api: Api) -> None:
    """A multi grader 300 deep was a 500 (RecursionError while copying it)."""
    r = api.post("/fine_tuning/alpha/graders/validate", json={"grader": multi(300)})
    assert error(r, 400)["code"] == "invalid_json"
    r = api.post("/fine_tuning/alpha/graders/validate", json={"grader": multi(40)})
    assert error(r, 400)["code"] == "invalid_json"  # two levels of JSON each: 82 in all
    r = api.post("/fine_tuning/alpha/graders/validate", json={"grader": multi(3)})
    found = error(r, 400)
    assert found["code"] == "invalid_grader"
    assert found["message"].startswith("grader.graders.a: a multi grader cannot contain another multi grader")
    assert api.post("/fine_tuning/alpha/graders/validate", json={"grader": multi(1)}).status_code == 200


def test_a_sample_nested_too_deeply_to_parse_is_graded_as_text(api: Api) -> None:
    """A model_sample of 100,000 '[' was a 500: its output_json parse hit Python's recursion limit."""
    grader = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "x",
              "operation": "eq"}  # fmt: skip
    r = api.post("/fine_tuning/alpha/graders/run", json={"grader": grader, "model_sample": deep(100_000)})
    assert r.status_code == 200, r.text
    assert r.json()["reward"] == 0.0


def test_a_prompts_file_line_nested_too_deeply_is_400(api: Api) -> None:
    good = json.dumps({"prompt": "Hello?"})
    file_id = api.upload(f"{good}\n{deep(100_000)}\n".encode(), "prompts.jsonl")
    r = api.client.post(
        "/tunery/v1/feedback/queues",
        headers=api.headers,
        json={"name": "q", "prompts_file": file_id, "model_a": "tiny-random"},
    )
    found = error(r, 400)
    assert found["param"] == "prompts_file" and found["code"] == "invalid_file"
    assert f"File {file_id}, line 2: nested too deeply" in found["message"]


# --- numbers ----------------------------------------------------------------------------------------------


def test_hyperparameters_name_their_range_and_refuse_booleans(api: Api) -> None:
    def job(**hyperparameters: Any) -> httpx.Response:
        method = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
        return api.post(
            "/fine_tuning/jobs", json={"model": "tiny-random", "training_file": "f", "method": method}
        )

    param = "method.supervised.hyperparameters.n_epochs"
    assert error(job(n_epochs=100), 400) == {
        "message": f"Invalid value for '{param}': must be 'auto' or an integer from 1 to 50, got 100",
        "type": "invalid_request_error",
        "param": param,
        "code": "invalid_value",
    }
    assert error(job(n_epochs=True), 400)["message"].endswith("got true")
    assert error(job(n_epochs=2.5), 400)["param"] == param
    found = error(job(learning_rate_multiplier=0), 400)
    assert found["param"] == "method.supervised.hyperparameters.learning_rate_multiplier"
    assert found["message"].endswith("must be 'auto' or a number above 0 and at most 100, got 0")
    assert error(job(batch_size=False), 400)["param"] == "method.supervised.hyperparameters.batch_size"
    r = api.post("/fine_tuning/jobs", json={"model": "tiny-random", "training_file": "f", "seed": True})
    assert error(r, 400)["param"] == "seed"
    # valid numbers, an integer for a float among them, pass to the next check (the file does not exist)
    assert (
        error(job(n_epochs=3, learning_rate_multiplier=2, batch_size="auto"), 400)["param"] == "training_file"
    )


def test_chat_numbers_are_bounded_and_never_booleans(api: Api) -> None:
    def chat(**body: Any) -> httpx.Response:
        messages = [{"role": "user", "content": "Hi"}]
        return api.post("/chat/completions", json={"model": "tiny-random", "messages": messages, **body})

    found = error(chat(seed=2**64), 400)  # was a 500 whose text leaked the exception
    assert found["param"] == "seed" and found["code"] == "invalid_value"
    assert "from -9223372036854775808 to 9223372036854775807" in found["message"]
    assert error(chat(seed=-(2**63) - 1), 400)["param"] == "seed"
    for name, value in [
        ("n", True),
        ("max_tokens", True),
        ("temperature", True),
        ("top_p", False),
        ("seed", True),
        ("max_completion_tokens", 0),
        ("temperature", 3),
        ("n", 17),
    ]:
        found = error(chat(**{name: value}), 400)
        assert found["param"] == name and found["code"] == "invalid_value", (name, value, found)
    assert error(chat(temperature=3), 400)["message"] == (
        "Invalid value for 'temperature': must be a number from 0 to 2, got 3"
    )
    # in range (an integer temperature too): on to the model, here a stand-in that is not there
    assert chat(temperature=1, seed=2**63 - 1, n=1).status_code == 503
    found = error(chat(stop=["a", "b", "c", "d", "e"]), 400)  # a union: the member that explains it
    assert found["param"] == "stop" and "at most 4 items" in found["message"]
    # 4 stop strings of 2 MB each, recorded whole in the audit log, had written 46 MB a second
    for stop in ("x" * 1001, ["a", "x" * 1001]):
        found = error(chat(stop=stop), 400)
        assert found["param"].startswith("stop") and "at most 1000 characters" in found["message"], found
    r = api.client.post("/v1/chat/completions", headers=api.headers, json=[1, 2])
    assert error(r, 400)["message"].startswith("Invalid request body: ")
