"""POST /v1/moderations (OpenAI's shape on the offline classifier, personal data as an extension) and the
chat completions output filter (`finish_reason: "content_filter"`), on a stand-in inference worker."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import Api, fake_settings
from tunery.server.app import create_app
from tunery.server.auth import create_key
from tunery.server.routes.moderations import CATEGORIES
from tunery.server.store import Store

HATEFUL = "You are a complete idiot and I hate you."
RUDE = "You are a complete idiot."


def test_shape_and_honest_coverage(api: Api) -> None:
    r = api.post("/moderations", json={"input": "Thanks, the new brakes work great!"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("modr-") and body["model"] == "omni-moderation-latest"
    [result] = body["results"]
    assert (
        result["flagged"] is False and set(result["categories"]) == set(CATEGORIES) and len(CATEGORIES) == 13
    )
    scores = result["category_scores"]
    assert 0 < scores["harassment"] == scores["hate"] < 0.5  # one classifier, reported as both
    assert all(scores[c] == 0.0 for c in CATEGORIES if c not in ("harassment", "hate"))
    applied = result["category_applied_input_types"]
    assert applied["harassment"] == applied["hate"] == ["text"] and applied["violence"] == []
    assert result["tunery_personal_data"] == []
    assert body["tunery_classifier"]["scored_categories"] == ["harassment", "hate"]


def test_flagged_text_and_arrays(api: Api) -> None:
    body = api.post(
        "/moderations", json={"input": [RUDE, "Where is my order?"], "model": "text-moderation-latest"}
    )
    out = body.json()
    assert out["model"] == "text-moderation-latest"
    rude, fine = out["results"]
    assert rude["flagged"] and rude["categories"]["harassment"] and rude["categories"]["hate"]
    assert not rude["categories"]["violence"] and rude["category_scores"]["harassment"] > 0.9
    assert not fine["flagged"] and not any(fine["categories"].values())
    parts = [{"type": "text", "text": "Where is my order?"}, {"type": "text", "text": RUDE}]
    [joined] = api.post("/moderations", json={"input": parts}).json()["results"]  # one result for all parts
    assert joined["flagged"]


def test_text_in_another_language_is_read_by_its_word_list(api: Api) -> None:
    """The classifier reads English: it scores an ordinary German question 0.95 and Spanish insults 0.03.
    Text in German, Spanish, French, Italian or Portuguese is read by that language's word list instead
    (1 with the listed words named, or 0); in a language without a list it is not scored, and says so."""
    german = "Was kostet die professionelle Montage bei Ihnen im Laden?"
    spanish = "Eres un idiota estúpido y te odio, vete al infierno."
    dutch = "Jullie zijn een stelletje waardeloze oplichters, geef me mijn geld terug."
    body = api.post("/moderations", json={"input": [german, spanish, dutch, RUDE]}).json()
    results = body["results"]
    assert [r["tunery_language"] for r in results] == ["de", "es", "nl", None]
    assert [r["flagged"] for r in results] == [False, True, False, True]
    assert [r["tunery_words"] for r in results] == [[], ["idiota"], [], []]
    assert [r["category_scores"]["harassment"] for r in results[:3]] == [0.0, 1.0, 0.0]
    assert results[1]["categories"]["hate"] and not results[1]["categories"]["violence"]
    for listed in results[:2]:
        assert listed["category_applied_input_types"]["harassment"] == ["text"]
    assert not any(results[2]["category_scores"].values())  # Dutch: no list, not scored
    assert not any(results[2]["category_applied_input_types"].values())
    assert "es" in body["tunery_classifier"]["word_list_languages"]


def test_personal_data_is_reported_but_never_flags(api: Api) -> None:
    text = "Mail jane.doe@gmail.com or support@shop.example"
    [result] = api.post("/moderations", json={"input": text}).json()["results"]
    assert result["flagged"] is False
    found = result["tunery_personal_data"]
    assert [(f["category"], f["text"], f["fictional"]) for f in found] == [
        ("email", "jane.doe@gmail.com", False),
        ("email", "support@shop.example", True),
    ]
    assert text[found[0]["start"] : found[0]["end"]] == "jane.doe@gmail.com"


def test_bad_input_and_auth(client: TestClient, api: Api) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    cases = [
        ({"input": []}, "input"),
        ({"input": [{"type": "text", "text": "hi"}, image]}, "input[1]"),
        ({"input": ["hi", {"type": "text", "text": "x"}]}, "input[0]"),
        ({}, "input"),
    ]
    for body, param in cases:
        r = api.post("/moderations", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert client.post("/v1/moderations", json={"input": "hi"}).status_code == 401
    bad = client.post("/v1/moderations", json={"input": "hi"}, headers={"Authorization": "Bearer sk-nope"})
    assert bad.status_code == 401


def test_the_openai_client_reads_it(client: TestClient, keys: dict[str, str]) -> None:
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key=keys["acme"], http_client=client)
    result = oai.moderations.create(input=HATEFUL, model="omni-moderation-latest").results[0]
    assert result.flagged and result.categories.harassment and not result.categories.self_harm
    assert result.category_scores.hate == result.category_scores.harassment


# --- the output filter on chat completions ---------------------------------------------------------------


class FakeInference:
    """Answers every chat request with `answers` (choice i gets answers[i]), streamed 4 characters a delta."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers

    async def stream(self, request: dict[str, Any], project: str = "") -> AsyncIterator[dict[str, Any]]:
        for i, text in enumerate(self.answers):
            for start in range(0, len(text), 4):
                yield {"event": "delta", "index": i, "text": text[start : start + 4]}
        choices = [
            {"index": i, "text": t, "finish_reason": "stop", "logprobs": None}
            for i, t in enumerate(self.answers)
        ]
        yield {"event": "done", "result": {"choices": choices, "prompt_tokens": 5, "completion_tokens": 9}}

    async def call(self, request: dict[str, Any], project: str = "") -> dict[str, Any]:
        async for message in self.stream(request):
            if message["event"] == "done":
                return dict(message["result"])
        raise AssertionError("no done event")

    async def close(self) -> None:
        pass


def chat_client(tmp_path: Path, **settings: Any) -> Iterator[Api]:
    s = fake_settings(tmp_path / "service", **settings)
    key = create_key(Store(s.database_url), "acme")[1]
    with TestClient(create_app(s, run_scheduler=False), raise_server_exceptions=False) as client:
        client.app.state.tunery.inference = FakeInference(["Happy to help with your order.", RUDE])
        yield Api(client, key)


@pytest.fixture
def chat_api(tmp_path: Path) -> Iterator[Api]:
    yield from chat_client(tmp_path)


@pytest.fixture
def moderated_api(tmp_path: Path) -> Iterator[Api]:
    yield from chat_client(tmp_path, moderate_completions=True)


def complete(api: Api, **extra: Any) -> list[dict[str, Any]]:
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "Hi"}], "n": 2, **extra}
    r = api.post("/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 9
    return list(r.json()["choices"])


def stream(api: Api, **extra: Any) -> tuple[dict[int, str], dict[int, str], int]:
    """Text per choice, finish reason per choice, and the number of content deltas."""
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "Hi"}], "n": 2, "stream": True}
    with api.client.stream("POST", "/v1/chat/completions", headers=api.headers, json=body | extra) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    texts: dict[int, str] = {0: "", 1: ""}
    reasons: dict[int, str] = {}
    deltas = 0
    for line in lines[:-1]:
        for choice in json.loads(line.removeprefix("data: "))["choices"]:
            if choice["delta"].get("content"):
                texts[choice["index"]] += choice["delta"]["content"]
                deltas += 1
            if choice["finish_reason"]:
                reasons[choice["index"]] = choice["finish_reason"]
    return texts, reasons, deltas


def test_no_filter_by_default(chat_api: Api) -> None:
    choices = complete(chat_api)
    assert [(c["message"]["content"], c["finish_reason"]) for c in choices] == [
        ("Happy to help with your order.", "stop"),
        (RUDE, "stop"),
    ]
    texts, reasons, deltas = stream(chat_api)
    assert texts[1] == RUDE and reasons == {0: "stop", 1: "stop"} and deltas > 2


def test_a_request_turns_the_filter_on(chat_api: Api) -> None:
    kept, withheld = complete(chat_api, tunery_content_filter=True)
    assert (kept["message"]["content"], kept["finish_reason"]) == ("Happy to help with your order.", "stop")
    assert (withheld["message"]["content"], withheld["finish_reason"]) == (None, "content_filter")
    assert withheld["logprobs"] is None
    texts, reasons, deltas = stream(chat_api, tunery_content_filter=True)
    # held back until scored: the passing answer arrives as one delta, the flagged one not at all
    assert texts == {0: "Happy to help with your order.", 1: ""} and deltas == 1
    assert reasons == {0: "stop", 1: "content_filter"}


def test_the_server_setting_filters_every_request(moderated_api: Api) -> None:
    assert [c["finish_reason"] for c in complete(moderated_api)] == ["stop", "content_filter"]
    # a request cannot turn the operator's filter off
    assert complete(moderated_api, tunery_content_filter=False)[1]["message"]["content"] is None
    texts, reasons, _ = stream(moderated_api)
    assert texts[1] == "" and reasons[1] == "content_filter"


def test_moderation_input_is_bounded_and_runs_off_the_api_threads(api: Api) -> None:
    too_long = {"input": "word " * 30_000}
    r = api.post("/moderations", json=too_long)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert "at most 131072" in r.json()["error"]["message"]
    r = api.post("/moderations", json={"input": ["x"] * 33})
    assert r.status_code == 400 and "at most 32" in r.json()["error"]["message"]
    assert api.post("/moderations", json={"input": "a'" * 60_000 + " @"}).status_code == 200
