"""Stored chat completions (`store: true`) through the official openai client: listed in order, paged,
filtered by model and metadata, read back as answered (streamed too), their messages, metadata updated,
deleted with their ratings; another project sees none of them; rows stored before the chat.completion
object was kept still read back."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.server.conftest import Studio
from tunery.server.feedback_store import Rating, StoredCompletion
from tunery.server.settings import Settings
from tunery.server.store import Store


def client_of(studio: Studio, key: str) -> openai.OpenAI:
    """The official client, its requests handled in process (a TestClient is an httpx.Client)."""
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=studio.client, max_retries=0
    )


def ask(client: openai.OpenAI, question: str, **extra: Any) -> Any:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    return client.chat.completions.create(model="tiny-random", messages=messages, **extra)  # type: ignore[arg-type]


def test_stored_completions_through_the_openai_client(
    studio: Studio, keys: dict[str, str], settings: Settings
) -> None:
    acme, globex = client_of(studio, keys["acme"]), client_of(studio, keys["globex"])
    first = ask(acme, "Where is my order?", store=True, metadata={"topic": "orders", "site": "eu"})
    ask(acme, "Not kept?")  # no store: not listed
    with ask(acme, "Do you ship abroad?", store=True, stream=True, n=2) as stream:
        chunks = list(stream)
    streamed_id = chunks[0].id
    third = ask(acme, "What are your hours?", store=True, metadata={"topic": "hours"})

    listed = list(acme.chat.completions.list())
    assert [c.id for c in listed] == [first.id, streamed_id, third.id]  # oldest first, as OpenAI's
    assert [c.id for c in acme.chat.completions.list(order="desc")] == [third.id, streamed_id, first.id]
    one_by_one = acme.chat.completions.list(limit=1)
    assert one_by_one.has_more and [c.id for c in one_by_one.data] == [first.id]
    assert [c.id for c in one_by_one] == [first.id, streamed_id, third.id]  # the client follows `after`
    assert [c.id for page in one_by_one.iter_pages() for c in page.data] == [first.id, streamed_id, third.id]
    assert [c.id for c in acme.chat.completions.list(metadata={"topic": "orders"})] == [first.id]
    assert [c.id for c in acme.chat.completions.list(metadata={"topic": "orders", "site": "us"})] == []
    assert [c.id for c in acme.chat.completions.list(model="tiny-random", order="desc", limit=2).data] == [
        third.id,
        streamed_id,
    ]
    assert list(acme.chat.completions.list(model="another-model")) == []

    got = acme.chat.completions.retrieve(first.id)
    assert (
        got.choices[0].message.content
        == first.choices[0].message.content
        == "tiny-random says: Where is my order?"
    )
    assert (got.usage, got.created, got.model) == (first.usage, first.created, first.model)
    assert got.metadata == {"topic": "orders", "site": "eu"}
    again = acme.chat.completions.retrieve(streamed_id)  # a streamed answer is kept whole, every choice
    assert [c.message.content for c in again.choices] == [
        "tiny-random says: Do you ship abroad?",
        "tiny-random says indeed, at length: Do you ship abroad?",
    ]
    assert again.choices[1].finish_reason == "stop" and again.usage is not None

    messages = list(acme.chat.completions.messages.list(first.id))
    assert [(m.id, m.role, m.content) for m in messages] == [
        (f"{first.id}-0", "system", "Be brief."),
        (f"{first.id}-1", "user", "Where is my order?"),
    ]
    paged = acme.chat.completions.messages.list(first.id, limit=1, order="desc")
    assert [m.content for page in paged.iter_pages() for m in page.data] == [
        "Where is my order?",
        "Be brief.",
    ]

    updated = acme.chat.completions.update(first.id, metadata={"topic": "returns"})
    assert updated.metadata == {"topic": "returns"}
    assert [c.id for c in acme.chat.completions.list(metadata={"topic": "returns"})] == [first.id]
    assert [c.id for c in acme.chat.completions.list(metadata={"topic": "orders"})] == []
    without = studio.ok(studio.get("/chat/completions", params={"metadata": "null"}))["data"]
    assert [c["id"] for c in without] == [streamed_id]  # stored without metadata
    acme.chat.completions.update(third.id, metadata=None)  # type: ignore[arg-type]
    without = studio.ok(studio.get("/chat/completions", params={"metadata": "null"}))["data"]
    assert [c["id"] for c in without] == [streamed_id, third.id]
    both = studio.get("/chat/completions", params={"metadata": "null", "metadata[topic]": "x"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "metadata"

    # another project: nothing listed, and acme's completions do not exist for it
    assert list(globex.chat.completions.list()) == []
    for call in (
        lambda: globex.chat.completions.retrieve(first.id),
        lambda: globex.chat.completions.update(first.id, metadata={"x": "y"}),
        lambda: globex.chat.completions.delete(first.id),
        lambda: globex.chat.completions.messages.list(first.id),
    ):
        with pytest.raises(openai.NotFoundError, match="store: true"):
            call()
    assert acme.chat.completions.retrieve(first.id).metadata == {"topic": "returns"}

    studio.ok(studio.tpost("/ratings", json={"completion_id": first.id, "rating": "up"}))
    deleted = acme.chat.completions.delete(first.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (first.id, True, "chat.completion.deleted")
    with pytest.raises(openai.NotFoundError):
        acme.chat.completions.retrieve(first.id)
    assert [c.id for c in acme.chat.completions.list()] == [streamed_id, third.id]
    assert studio.ok(studio.tget("/ratings"))["data"] == []  # its ratings went with it
    with pytest.raises(openai.NotFoundError):
        acme.chat.completions.delete(first.id)
    # the changes are in the project's audit log, which keeps the answer the completion held
    log = [json.loads(line) for line in (settings.audit_dir / "acme.jsonl").read_text().splitlines()]
    changes = [
        (r["type"], r["payload"])
        for r in log
        if r["type"].startswith("completion.") and r["payload"]["completion_id"] == first.id
    ]
    assert changes == [
        (
            "completion.updated",
            {
                "completion_id": first.id,
                "metadata": {"topic": "returns"},
                "previous": {"topic": "orders", "site": "eu"},
            },
        ),
        ("completion.deleted", {"completion_id": first.id, "ratings_deleted": 1}),
    ]
    answered = [r["payload"] for r in log if r["type"] == "inference.response"]
    assert first.id in {a["completion_id"] for a in answered}
    [asked] = [
        r["payload"]
        for r in log
        if r["type"] == "inference.request" and r["payload"]["completion_id"] == first.id
    ]
    assert (asked["store"], asked["metadata"]) == (True, {"topic": "orders", "site": "eu"})


def test_a_streamed_tool_call_is_stored_with_the_ids_the_client_got(
    studio: Studio, keys: dict[str, str]
) -> None:
    acme = client_of(studio, keys["acme"])
    weather = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    call = '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'  # the fake repeats it
    messages = [{"role": "user", "content": call}]
    with acme.chat.completions.create(
        model="tiny-random",
        messages=messages,
        tools=[weather],
        stream=True,
        store=True,  # type: ignore[arg-type, list-item]
    ) as stream:
        chunks = list(stream)
    deltas = [c for chunk in chunks for choice in chunk.choices for c in choice.delta.tool_calls or []]
    streamed = [c for c in deltas if c.id]  # a call's first delta; its arguments follow in others
    assert [c.function.name for c in streamed] == ["weather"] and {c.index for c in deltas} == {0}
    stored = acme.chat.completions.retrieve(chunks[0].id).choices[0]
    assert stored.finish_reason == "tool_calls" and stored.message.tool_calls is not None
    assert [c.id for c in stored.message.tool_calls] == [c.id for c in streamed]
    arguments = "".join(c.function.arguments or "" for c in deltas)
    assert stored.message.tool_calls[0].function.arguments == arguments == '{"city": "Oslo"}'


def test_bad_metadata_and_paging_are_400s_naming_the_parameter(studio: Studio) -> None:
    hello = [{"role": "user", "content": "Hi"}]
    too_many = {str(i): "v" for i in range(17)}
    for metadata in (too_many, {"k" * 65: "v"}, {"k": "v" * 513}, {"k": 3}, {"k": "a\x00b"}, {"a\x00": "v"}):
        r = studio.post(
            "/chat/completions",
            json={"model": "tiny-random", "messages": hello, "store": True, "metadata": metadata},
        )
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("metadata"), r.text
    made = studio.ok(
        studio.post("/chat/completions", json={"model": "tiny-random", "messages": hello, "store": True})
    )
    for query in ("limit=0", "limit=101", "order=sideways"):
        r = studio.get(f"/chat/completions?{query}")
        assert r.status_code == 400, (query, r.text)
    r = studio.get("/chat/completions", params={f"metadata[k{i}]": "v" for i in range(17)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"
    r = studio.get("/chat/completions?after=chatcmpl-nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "after"
    r = studio.post(f"/chat/completions/{made['id']}", json={"metadata": {"k": "v"}, "other": 1})
    assert r.status_code == 400
    # keys that are awkward in a JSON path filter as plain strings, never a server error
    for key in ('a"b', "a.b", "$", "a]b", "a\\b", "é"):
        r = studio.get("/chat/completions", params={f"metadata[{key}]": "v"})
        assert r.status_code == 200 and r.json()["data"] == [], (key, r.text)
    studio.ok(studio.post(f"/chat/completions/{made['id']}", json={"metadata": {'a"b': "v", "a.b": "w"}}))
    for key, value in (('a"b', "v"), ("a.b", "w")):
        r = studio.get("/chat/completions", params={f"metadata[{key}]": value})
        assert [c["id"] for c in studio.ok(r)["data"]] == [made["id"]], key


def test_a_completion_stored_by_an_older_tunery_reads_back(
    studio: Studio, settings: Settings, keys: dict[str, str]
) -> None:
    """Before the answered object and metadata were kept, a row held the messages and texts only."""
    store = Store(settings.database_url)
    acme = client_of(studio, keys["acme"])
    made = ask(acme, "Hi", store=True)
    with store.session() as session:
        row = session.get(StoredCompletion, made.id)
        assert row is not None
        row.response, row.seq, row.completion_metadata = None, None, None
        session.add(
            Rating(
                id="rating_old",
                completion_id=row.id,
                project_id=row.project_id,
                key_id=row.key_id,
                end_user="",
                choice_index=0,
                rating="up",
                created_at=row.created_at,
                updated_at=row.created_at,
            )
        )
    old = acme.chat.completions.retrieve(made.id)
    assert old.choices[0].message.content == made.choices[0].message.content and old.metadata == {}
    assert [c.id for c in acme.chat.completions.list()] == [made.id]
    assert acme.chat.completions.delete(made.id).deleted
