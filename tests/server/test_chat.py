"""Chat completions and model graders through the real inference worker (tiny-random)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import Api
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.settings import Settings
from tunery.server.store import Store

HELLO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
]


@pytest.fixture(scope="module")
def chat_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("chat") / "service")
    key = create_key(Store(settings.database_url), "acme")[1]
    with TestClient(create_app(settings, run_scheduler=False), raise_server_exceptions=False) as client:
        yield Api(client, key)


def complete(api: Api, **body) -> dict:
    r = api.post("/chat/completions", json={"model": "tiny-random", "messages": HELLO, **body})
    assert r.status_code == 200, r.text
    return dict(r.json())


def sse(api: Api, **body) -> list[dict]:
    with api.client.stream(
        "POST",
        "/v1/chat/completions",
        headers=api.headers,
        json={"model": "tiny-random", "messages": HELLO, "stream": True, **body},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_completion_shape_usage_seed_and_logprobs(chat_api: Api) -> None:
    out = complete(chat_api, max_tokens=6, n=2, temperature=1.0, seed=3, logprobs=True)
    assert (
        out["object"] == "chat.completion"
        and out["id"].startswith("chatcmpl-")
        and out["model"] == "tiny-random"
    )
    assert [c["index"] for c in out["choices"]] == [0, 1]
    usage = out["usage"]
    assert (
        usage["prompt_tokens"] > 10
        and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )
    for choice in out["choices"]:
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
        tokens = choice["logprobs"]["content"]
        assert all(t["logprob"] <= 0 and t["top_logprobs"] == [] for t in tokens)
    assert usage["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in out["choices"])
    again = complete(chat_api, max_tokens=6, n=2, temperature=1.0, seed=3)
    assert [c["message"]["content"] for c in again["choices"]] == [
        c["message"]["content"] for c in out["choices"]
    ]
    assert again["choices"][0]["logprobs"] is None
    assert complete(chat_api, max_completion_tokens=2, max_tokens=50)["usage"]["completion_tokens"] <= 2


def test_greedy_stop_and_streaming(chat_api: Api) -> None:
    greedy = complete(chat_api, temperature=0, max_tokens=12)["choices"][0]
    text = greedy["message"]["content"]
    assert greedy["finish_reason"] == "length" and len(text) >= 4
    k = next(i for i in range(1, len(text)) if text[i] not in text[:i])
    stopped = complete(chat_api, temperature=0, max_tokens=12, stop=[text[k]])["choices"][0]
    assert stopped["message"]["content"] == text[:k] and stopped["finish_reason"] == "stop"

    chunks = sse(chat_api, temperature=0, max_tokens=12, stream_options={"include_usage": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == text
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in chunks[:-1])
    plain = sse(chat_api, temperature=0, max_tokens=3)
    assert all("usage" not in c for c in plain)


def test_chat_errors(chat_api: Api) -> None:
    cases = [
        ({"tools": [{"type": "function", "function": {"name": "f f"}}]}, "tools.0.function.name"),
        ({"top_logprobs": 3, "logprobs": True}, "top_logprobs"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"n": 0}, "n"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
        ({"messages": []}, "messages"),
    ]
    for extra, param in cases:
        r = chat_api.post("/chat/completions", json={"model": "tiny-random", "messages": HELLO, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    r = chat_api.post("/chat/completions", json={"model": "gpt-4o", "messages": HELLO})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_model_grader_runs_in_the_worker(chat_api: Api) -> None:
    judge = {
        "type": "score_model",
        "name": "judge",
        "model": "tiny-random",
        "input": [{"role": "user", "content": "Rate: {{sample.output_text}}"}],
        "sampling_params": {"max_completions_tokens": 8},
    }
    assert chat_api.post("/fine_tuning/alpha/graders/validate", json={"grader": judge}).json() == {
        "grader": judge
    }
    r = chat_api.post("/fine_tuning/alpha/graders/run", json={"grader": judge, "model_sample": "fine"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0.0 <= body["reward"] <= 1.0 and body["metadata"]["type"] == "score_model"
    assert body["model_grader_token_usage_per_model"]
    bad = {**judge, "range": [1, 0]}
    r = chat_api.post("/fine_tuning/alpha/graders/validate", json={"grader": bad})
    assert r.status_code == 400, r.text


def test_worker_log_is_kept(chat_api: Api) -> None:
    settings = chat_api.client.app.state.tunery.settings
    assert Path(settings.logs_dir / "inference.log").exists()


def test_a_prompt_longer_than_the_context_is_refused(chat_api: Api) -> None:
    """Prefill memory grows with the square of the prompt: prompt + max_tokens must fit the model
    (tiny-random: 4096 positions), as OpenAI's context_length_exceeded says."""
    long = [{"role": "user", "content": "word " * 5000}]
    for body in ({"messages": long}, {"messages": HELLO, "max_tokens": 4096}, {"messages": long, "n": 16}):
        r = chat_api.post("/chat/completions", json={"model": "tiny-random", **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert "maximum context length is 4096 tokens" in error["message"]
    r = chat_api.post("/chat/completions", json={"model": "tiny-random", "messages": long, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # megabytes are refused before they are tokenized
    huge = [{"role": "user", "content": "x" * 3_000_000}]
    r = chat_api.post("/chat/completions", json={"model": "tiny-random", "messages": huge})
    assert r.status_code == 400 and "at least" in r.json()["error"]["message"]
    assert complete(chat_api, max_tokens=4)["choices"][0]["message"]["content"] is not None


def test_a_judge_prompt_longer_than_the_context_fails_the_sample(chat_api: Api) -> None:
    judge = {
        "type": "score_model",
        "name": "judge",
        "model": "tiny-random",
        "input": [{"role": "user", "content": "Rate: {{sample.output_text}}"}],
        "sampling_params": {"max_completion_tokens": 10**9},
    }
    for sample, grader in (("fine", judge), ("word " * 5000, {**judge, "sampling_params": {}})):
        r = chat_api.post("/fine_tuning/alpha/graders/run", json={"grader": grader, "model_sample": sample})
        assert r.status_code == 200, r.text
        errors = r.json()["metadata"]["errors"]
        assert errors["model_grader_server_error"] is True
        assert "maximum context length" in errors["model_grader_server_error_details"]


def test_a_slow_grader_in_the_worker_does_not_hold_up_chat(chat_api: Api) -> None:
    """Graders with a model run in the worker, python sub-graders included (up to their timeout): on
    their own thread there, so chat requests are answered meanwhile."""
    import threading

    slow = {
        "type": "multi",
        "name": "slow",
        "graders": {
            "wait": {
                "type": "python",
                "name": "wait",
                "source": "import time\ndef grade(sample, item):\n    time.sleep(4)\n    return 1.0\n",
            },
            "judge": {
                "type": "score_model",
                "name": "judge",
                "model": "tiny-random",
                "input": [{"role": "user", "content": "Rate: {{sample.output_text}}"}],
            },
        },
        "calculate_output": "wait",
    }
    graded: list[dict] = []
    grading = threading.Thread(
        target=lambda: graded.append(
            chat_api.post("/fine_tuning/alpha/graders/run", json={"grader": slow, "model_sample": "x"}).json()
        )
    )
    grading.start()
    try:
        import time

        time.sleep(1.0)  # the grader is in the worker, sleeping in its sandbox
        answer = complete(chat_api, max_tokens=4)
        assert answer["choices"] and not graded  # answered while the grader still sleeps
    finally:
        grading.join(60)
    assert graded and graded[0]["reward"] == 1.0, graded


def test_a_long_answer_does_not_make_a_short_one_wait(chat_api: Api) -> None:
    """One project's n=16, thousands-of-tokens answer once held the worker until it was done (28 minutes
    on the bundled model). Chat requests now decode step by step in turn: a short request of another
    project is answered while the long one is still streaming."""
    import threading

    first_delta, stop, ended = threading.Event(), threading.Event(), threading.Event()

    def long_answer() -> None:
        body = {"model": "tiny-random", "messages": HELLO, "stream": True, "n": 16, "max_tokens": 3000}
        body["temperature"] = 0  # greedy: this prompt never ends before max_tokens on tiny-random
        with chat_api.client.stream("POST", "/v1/chat/completions", headers=chat_api.headers, json=body) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    first_delta.set()
                if stop.is_set() or line == "data: [DONE]":
                    break
        ended.set()

    streaming = threading.Thread(target=long_answer)
    streaming.start()
    try:
        assert first_delta.wait(60)
        short = complete(chat_api, max_tokens=4)
        assert short["choices"] and not ended.is_set()  # answered while the long one still streams
    finally:
        stop.set()
        streaming.join(60)


def test_a_project_waiting_on_python_graders_does_not_hold_up_anothers_model_grader(chat_api: Api) -> None:
    """Grader requests run two at a time in the worker, one a project: while acme's grader sleeps in its
    sandbox, globex's model grader is answered."""
    import threading

    settings = chat_api.client.app.state.tunery.settings
    globex = Api(chat_api.client, create_key(Store(settings.database_url), "globex")[1])
    judge = {
        "type": "score_model",
        "name": "judge",
        "model": "tiny-random",
        "input": [{"role": "user", "content": "Rate: {{sample.output_text}}"}],
    }
    slow = {
        "type": "multi",
        "name": "slow",
        "graders": {
            "wait": {
                "type": "python",
                "name": "wait",
                "source": "import time\ndef grade(sample, item):\n    time.sleep(4)\n    return 1.0\n",
            },
            "judge": judge,
        },
        "calculate_output": "wait",
    }
    slow_done = threading.Event()

    def run_slow() -> None:
        chat_api.post("/fine_tuning/alpha/graders/run", json={"grader": slow, "model_sample": "x"})
        slow_done.set()

    waiting = threading.Thread(target=run_slow)
    waiting.start()
    try:
        import time

        time.sleep(1.0)  # acme's grader is in the worker, sleeping in its sandbox
        r = globex.post("/fine_tuning/alpha/graders/run", json={"grader": judge, "model_sample": "fine"})
        assert r.status_code == 200 and not slow_done.is_set()
    finally:
        waiting.join(60)
