"""The feedback studio in process: labellers' keys and what they may call, queues built from a prompts
file through a fake inference worker, labelling (blind, stable order, each label committed at once),
quality numbers worked by hand, exports, training jobs (DPO, KTO, reward model) on the fake CLI, blind
comparisons and promotion, and ratings of stored chat completions."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import TERMINAL, FakeInference, Studio, jsonl
from tunery import cli
from tunery.server.app import create_app
from tunery.server.feedback import shown_flipped
from tunery.server.feedback_report import held_out_split
from tunery.server.feedback_store import FeedbackQueue
from tunery.server.routes import comparisons
from tunery.server.settings import Settings
from tunery.server.store import Store

PROMPTS = [
    {"messages": [{"role": "user", "content": "Where is my order?"}]},
    {"prompt": "Can I return a bike?"},
    {  # a chat training line: its answer is dropped
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Do you ship abroad?"},
            {"role": "assistant", "content": "Only to Canada."},
        ]
    },
    {"input": {"messages": [{"role": "user", "content": "What are your hours?"}]}, "preferred_output": []},
]


def error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def imported_queue(studio: Studio, answers: list[tuple[str, str]], **body: Any) -> dict[str, Any]:
    queue = studio.ok(studio.tpost("/feedback/queues", json={"name": "imported", **body}))
    items = [{"prompt": f"Question {i}?", "answers": list(pair)} for i, pair in enumerate(answers)]
    return studio.ok(studio.tpost(f"/feedback/queues/{queue['id']}/items", json={"items": items}))


# --- keys and roles --------------------------------------------------------------------------------------


def test_labeller_keys_can_only_label(studio: Studio, settings: Settings, capsys: Any) -> None:
    ann = studio.labeller("Ann")
    me = ann.ok(ann.tget("/me"))
    assert (me["role"], me["name"], me["project"]) == ("labeller", "Ann", "acme")
    assert studio.ok(studio.tget("/me"))["role"] == "admin"
    for response in (
        ann.get("/models"),
        ann.get("/files"),
        ann.post(
            "/chat/completions", json={"model": "tiny-random", "messages": [{"role": "user", "content": "x"}]}
        ),
        ann.tpost("/feedback/queues", json={"name": "mine"}),
        ann.tget("/labellers"),
        ann.tget("/fine_tuning/jobs"),
        ann.tget("/comparisons"),
        ann.tpost("/projects/current_model", json={"model": "tiny-random"}),
        ann.tpost("/ratings", json={"completion_id": "chatcmpl-x", "rating": "up"}),
    ):
        body = error(response, 403)
        assert body["code"] == "insufficient_permissions" and "labeller 'Ann'" in body["message"]
    assert ann.ok(ann.tget("/feedback/queues"))["data"] == []

    assert error(studio.tpost("/labellers", json={"name": "Ann"}), 400)["code"] == "labeller_exists"
    listed = studio.ok(studio.tget("/labellers"))["data"]
    assert [(x["name"], x["labels"], x["revoked_at"]) for x in listed] == [("Ann", 0, None)]
    assert "key" not in listed[0]  # shown once, at creation
    revoked = studio.ok(studio.tdelete(f"/labellers/{listed[0]['id']}"))
    assert revoked["deleted"] and revoked["revoked_at"]
    assert error(ann.tget("/me"), 401)["code"] == "invalid_api_key"  # at once: the cache forgets it
    assert error(studio.tdelete("/labellers/key_nope"), 404)["code"] == "labeller_not_found"

    data_dir = ["--data-dir", str(settings.data_dir)]
    assert cli.main(["keys", "create", "--project", "acme", "--labeller", "Bob", *data_dir]) == 0
    key = capsys.readouterr().out.strip()
    assert Studio(studio.client, key).ok(Studio(studio.client, key).tget("/me"))["name"] == "Bob"
    assert cli.main(["keys", "list", *data_dir]) == 0
    shown = capsys.readouterr().out
    assert "labeller Bob" in shown and "labeller Ann" in shown and "  revoked" in shown and "admin" in shown


def test_an_older_database_gets_the_new_key_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE projects (id VARCHAR(64) PRIMARY KEY, name VARCHAR(64), created_at BIGINT)")
    db.execute(
        "CREATE TABLE api_keys (id VARCHAR(64) PRIMARY KEY, project_id VARCHAR(64), key_hash VARCHAR(64), "
        "prefix VARCHAR(32), created_at BIGINT, revoked_at BIGINT)"
    )
    db.execute("INSERT INTO api_keys VALUES ('key_1', 'proj_1', 'h', 'sk-tunery-x', 1, NULL)")
    db.commit()
    db.close()
    for _ in range(2):  # idempotent
        Store(f"sqlite:///{path}").close()
    assert sqlite3.connect(path).execute("SELECT role, name FROM api_keys").fetchall() == [("admin", None)]


# --- queues and generation ------------------------------------------------------------------------------------


def test_a_queue_is_answered_in_the_background_and_shown_blind(studio: Studio, fake: FakeInference) -> None:
    prompts = studio.upload(jsonl(PROMPTS), "prompts.jsonl")
    queue = studio.ok(
        studio.tpost(
            "/feedback/queues",
            json={
                "name": "support tone",
                "prompts_file": prompts,
                "model_a": "tiny-random",
                "model_b": "smollm2-135m-instruct",
                "labels_per_item": 2,
                "max_tokens": 32,
                "temperature": 0.5,
                "instructions": "Pick the kinder answer.",
            },
        )
    )
    assert queue["id"].startswith("fq_") and queue["items"]["total"] == 4 and queue["labels_per_item"] == 2
    assert (queue["model_a"], queue["model_b"]) == ("tiny-random", "smollm2-135m-instruct")
    done = studio.wait_queue(queue["id"])
    assert done["status"] == "ready" and done["items"] == {"total": 4, "ready": 4, "pending": 0, "failed": 0}
    assert {r["params"]["max_new_tokens"] for r in fake.requests} == {32}
    assert {r["params"]["temperature"] for r in fake.requests} == {0.5}
    assert {r["params"]["seed"] for r in fake.requests} == {None}  # no seed asked for

    items = studio.ok(studio.tget(f"/feedback/queues/{queue['id']}/items"))["data"]
    assert [i["messages"][-1]["content"] for i in items] == [
        "Where is my order?",
        "Can I return a bike?",
        "Do you ship abroad?",
        "What are your hours?",
    ]
    assert items[2]["messages"][-1]["role"] == "user" and len(items[2]["messages"]) == 2  # answer dropped
    assert (items[0]["model_1"], items[0]["model_2"]) == ("tiny-random", "smollm2-135m-instruct")
    assert items[0]["answer_1"] == "tiny-random says: Where is my order?"

    ann = studio.labeller("Ann")
    seen = ann.ok(ann.tget(f"/feedback/queues/{queue['id']}"))
    assert "model_a" not in seen and "model_b" not in seen and "prompts_file" not in seen
    listed = ann.ok(ann.tget("/feedback/queues"))["data"]
    assert [q["id"] for q in listed] == [queue["id"]] and "model_a" not in listed[0]
    nxt = ann.ok(ann.tget(f"/feedback/queues/{queue['id']}/next"))
    assert nxt["queue"]["instructions"] == "Pick the kinder answer."
    assert set(nxt["item"]) == {
        "object",
        "id",
        "queue_id",
        "mode",
        "position",
        "messages",
        "left",
        "right",
        "label",
    }
    assert {nxt["item"]["left"], nxt["item"]["right"]} == {items[0]["answer_1"], items[0]["answer_2"]}
    assert error(ann.tget(f"/feedback/queues/{queue['id']}/items"), 403)["code"] == "insufficient_permissions"
    assert error(ann.tget(f"/feedback/queues/{queue['id']}/quality"), 403)


def test_one_model_sampled_twice_and_thumbs(studio: Studio, fake: FakeInference) -> None:
    prompts = studio.upload(jsonl(PROMPTS[:2]), "prompts.jsonl")
    pair = studio.ok(
        studio.tpost(
            "/feedback/queues", json={"name": "self", "prompts_file": prompts, "model_a": "tiny-random"}
        )
    )
    studio.wait_queue(pair["id"])
    [item, _] = studio.ok(studio.tget(f"/feedback/queues/{pair['id']}/items"))["data"]
    assert item["model_1"] == item["model_2"] == "tiny-random" and item["answer_1"] != item["answer_2"]
    assert fake.requests[0]["n"] == 2

    thumbs = studio.ok(
        studio.tpost(
            "/feedback/queues",
            json={"name": "thumbs", "mode": "thumbs", "prompts_file": prompts, "model_a": "tiny-random"},
        )
    )
    studio.wait_queue(thumbs["id"])
    nxt = studio.ok(studio.tget(f"/feedback/queues/{thumbs['id']}/next"))["item"]
    assert nxt["answer"] == "tiny-random says: Where is my order?" and "left" not in nxt
    bad = studio.tpost(f"/feedback/items/{nxt['id']}/labels", json={"choice": "left"})
    assert "takes choice up, down" in error(bad, 400)["message"]
    assert (
        studio.ok(studio.tpost(f"/feedback/items/{nxt['id']}/labels", json={"choice": "up"}))["choice"]
        == "up"
    )


def test_bad_queues_are_refused(studio: Studio, globex: Studio) -> None:
    prompts = studio.upload(jsonl(PROMPTS), "prompts.jsonl")
    cases = [
        ({"prompts_file": prompts}, "model_a"),
        ({"prompts_file": prompts, "model_a": "nope"}, "model_a"),
        ({"prompts_file": prompts, "model_a": "tiny-random", "model_b": "nope"}, "model_b"),
        (
            {"prompts_file": prompts, "model_a": "tiny-random", "mode": "thumbs", "model_b": "tiny-random"},
            "model_b",
        ),
        ({"prompts_file": prompts, "model_a": "tiny-random", "temperature": 0}, "temperature"),
        ({"model_a": "tiny-random"}, "prompts_file"),
        (
            {"prompts_file": globex.upload(jsonl(PROMPTS), "p.jsonl"), "model_a": "tiny-random"},
            "prompts_file",
        ),
        ({"prompts_file": prompts, "model_a": "tiny-random", "labels_per_item": 0}, "labels_per_item"),
        ({"prompts_file": prompts, "model_a": "tiny-random", "labels_per_item": True}, "labels_per_item"),
        ({"prompts_file": prompts, "model_a": "tiny-random", "max_tokens": 10**9}, "max_tokens"),
    ]
    for body, param in cases:
        response = studio.tpost("/feedback/queues", json={"name": "q", **body})
        assert response.status_code in (400, 404) and response.json()["error"]["param"] == param, (
            body,
            response.text,
        )
    broken = studio.upload(
        jsonl([PROMPTS[0], {"messages": [{"role": "assistant", "content": "hi"}]}]), "b.jsonl"
    )
    body = {"name": "q", "prompts_file": broken, "model_a": "tiny-random"}
    message = error(studio.tpost("/feedback/queues", json=body), 400)["message"]
    assert f"File {broken}, line 2: the prompt has no user turn" in message

    queue = imported_queue(studio, [("a", "b")])
    assert error(globex.tget(f"/feedback/queues/{queue['id']}"), 404)["code"] == "feedback_queue_not_found"
    item = studio.ok(studio.tget(f"/feedback/queues/{queue['id']}/next"))["item"]
    assert error(globex.tpost(f"/feedback/items/{item['id']}/labels", json={"choice": "tie"}), 404)
    assert error(studio.tpost(f"/feedback/items/{item['id']}/labels", json={"choice": "up"}), 400)
    seconds = error(
        studio.tpost(f"/feedback/items/{item['id']}/labels", json={"choice": "tie", "seconds": True}), 400
    )
    assert seconds["param"] == "seconds" and "got true" in seconds["message"]
    wrong = {"items": [{"prompt": "x", "answers": ["only one"]}]}
    assert (
        "needs 2 answers"
        in error(studio.tpost(f"/feedback/queues/{queue['id']}/items", json=wrong), 400)["message"]
    )


def test_generation_failures(studio: Studio, fake: FakeInference) -> None:
    prompts = studio.upload(jsonl(PROMPTS), "prompts.jsonl")
    broken = studio.ok(
        studio.tpost(
            "/feedback/queues",
            json={"name": "broken", "prompts_file": prompts, "model_a": "tiny-random", "model_b": "broken"},
        )
    )
    done = studio.wait_queue(broken["id"])
    assert done["status"] == "failed" and done["items"]["failed"] == 4
    assert "The model could not be loaded." in done["error"]

    fake.down = True
    queue = studio.ok(
        studio.tpost(
            "/feedback/queues", json={"name": "down", "prompts_file": prompts, "model_a": "tiny-random"}
        )
    )
    stopped = studio.wait_queue(queue["id"])
    assert stopped["status"] == "failed" and stopped["items"]["pending"] == 4
    assert "Generation stopped" in stopped["error"] and "/generate" in stopped["error"]
    fake.down = False
    assert studio.ok(studio.tpost(f"/feedback/queues/{queue['id']}/generate"))["status"] == "generating"
    assert studio.wait_queue(queue["id"])["items"]["ready"] == 4
    again = studio.tpost(f"/feedback/queues/{queue['id']}/generate")
    assert error(again, 400)["code"] == "nothing_to_generate"


def test_generation_resumes_after_a_restart(settings: Settings, keys: dict[str, str]) -> None:
    class Slow(FakeInference):
        async def stream(self, request: dict[str, Any], project: str = "") -> AsyncIterator[dict[str, Any]]:
            import asyncio

            await asyncio.sleep(0.2)
            async for message in super().stream(request):
                yield message

    app = create_app(settings)
    app.state.tunery.inference = Slow()
    with TestClient(app) as client:
        studio = Studio(client, keys["acme"])
        prompts = studio.upload(jsonl(PROMPTS), "prompts.jsonl")
        body = {"name": "slow", "prompts_file": prompts, "model_a": "tiny-random", "model_b": "tiny-random"}
        queue = studio.ok(studio.tpost("/feedback/queues", json=body))
    app = create_app(settings)
    app.state.tunery.inference = FakeInference()
    with TestClient(app) as client:
        studio = Studio(client, keys["acme"])
        done = studio.wait_queue(queue["id"])
        assert done["status"] == "ready" and done["items"]["ready"] == 4


# --- labelling ---------------------------------------------------------------------------------------------


def test_labels_are_committed_at_once_and_survive_a_closed_browser(
    studio: Studio, settings: Settings
) -> None:
    answers = [(f"first {i}", f"second answer {i}") for i in range(4)]
    queue = imported_queue(studio, answers, labels_per_item=2)
    ann, bob = studio.labeller("Ann"), studio.labeller("Bob")

    first = ann.ok(ann.tget(f"/feedback/queues/{queue['id']}/next"))
    assert first["progress"]["left_for_me"] == 4 and first["progress"]["labels_needed"] == 8
    # the browser reloads: the same item, its answers on the same sides
    assert ann.ok(ann.tget(f"/feedback/queues/{queue['id']}/next"))["item"] == first["item"]
    label = ann.press(first["item"], "first 0", comment="clearer", seconds=4.5)
    assert (label["comment"], label["seconds"]) == ("clearer", 4.5)
    # ... and closes before the next item shows: nothing is lost, the next call goes on
    second = ann.ok(ann.tget(f"/feedback/queues/{queue['id']}/next"))
    assert second["item"]["position"] == 1 and second["progress"]["labelled_by_me"] == 1
    ann.press(second["item"], "second answer 1")
    # undo: the labeller looks at an item again and changes the label; still one label per labeller
    back = ann.ok(ann.tget(f"/feedback/items/{second['item']['id']}"))
    assert back["label"]["choice"] == ("left" if back["left"] == "second answer 1" else "right")
    changed = ann.ok(ann.tpost(f"/feedback/items/{back['id']}/labels", json={"choice": "tie"}))
    assert changed["choice"] == "tie" and changed["created_at"] <= changed["updated_at"]

    # Bob's order is his own, stable, and maps back to the right answer
    assert {shown_flipped(f"fi_{i}", "key_x", "secret") for i in range(30)} == {
        True,
        False,
    }  # a coin per pair
    # keyed with the queue's secret: the item's id and the labeller's key id (both known to the labeller)
    # do not give the order away, and the secret is in no answer of the API
    plain = [shown_flipped(f"fi_{i}", "key_x", None) for i in range(64)]
    keyed = [shown_flipped(f"fi_{i}", "key_x", "secret") for i in range(64)]
    assert 16 < sum(a != b for a, b in zip(plain, keyed, strict=True)) < 48
    with studio.client.app.state.tunery.store.session() as session:  # type: ignore[attr-defined]
        order_key = session.get(FeedbackQueue, queue["id"]).order_key
    assert order_key and len(order_key) == 32
    assert order_key not in json.dumps(studio.ok(studio.tget(f"/feedback/queues/{queue['id']}")))
    for _ in range(4):
        item = bob.ok(bob.tget(f"/feedback/queues/{queue['id']}/next"))["item"]
        bob.press(item, item["left"])  # always the left one
    assert bob.ok(bob.tget(f"/feedback/queues/{queue['id']}/next"))["item"] is None

    items = studio.ok(studio.tget(f"/feedback/queues/{queue['id']}/items"))["data"]
    by_labeller = {(i["position"], x["labeller"]): x for i in items for x in i["labels"]}
    assert by_labeller[(0, "Ann")]["choice"] == "answer_1"
    assert by_labeller[(1, "Ann")]["choice"] == "tie"
    for i in items:
        bob_label = by_labeller[(i["position"], "Bob")]
        # Bob pressed left: he chose answer_2 exactly where he saw the pair flipped
        assert (bob_label["choice"] == "answer_2") == bob_label["shown_flipped"]
    assert sum(len(i["labels"]) for i in items) == 6
    progress = ann.ok(ann.tget(f"/feedback/queues/{queue['id']}/progress"))
    assert (progress["labels"], progress["labelled_by_me"], progress["left_for_me"]) == (6, 2, 2)
    # every label given, and the change, is in the project's audit log under the labeller's key
    log = [json.loads(line) for line in (settings.audit_dir / "acme.jsonl").read_text().splitlines()]
    labels = [r for r in log if r["type"] == "feedback.label"]
    ann_id = ann.ok(ann.tget("/me"))["key_id"]
    assert len(labels) == 7 and sum(r["actor"]["key_id"] == ann_id for r in labels) == 3
    assert labels[0]["payload"]["comment"] == "clearer" and labels[2]["payload"]["choice"] == "tie"


def test_the_last_slot_goes_to_one_labeller_when_it_can(studio: Studio) -> None:
    queue = imported_queue(studio, [("a0", "b0"), ("a1", "b1")], labels_per_item=1)
    ann, bob = studio.labeller("Ann"), studio.labeller("Bob")
    to_ann = ann.ok(ann.tget(f"/feedback/queues/{queue['id']}/next"))["item"]
    to_bob = bob.ok(bob.tget(f"/feedback/queues/{queue['id']}/next"))["item"]
    assert to_ann["position"] == 0 and to_bob["position"] == 1
    ann.press(to_ann, "a0")
    bob.press(to_bob, "b1")
    assert ann.ok(ann.tget(f"/feedback/queues/{queue['id']}/next"))["item"] is None


# --- quality, exports -------------------------------------------------------------------------------------

# Three labellers on six items (stored choices; 1 = answer_1, 2 = answer_2). answer_1 is the longer one
# on items 0-2, answer_2 on items 3-5.
CHOICES = {
    "Ann": ["answer_1", "answer_1", "answer_2", "answer_1", "tie", "answer_2"],
    "Bob": ["answer_1", "answer_1", "answer_2", "answer_2", "tie", "answer_2"],
    "Cy": ["answer_1", "answer_2", "answer_2", "tie", "tie", "answer_1"],
}
SECONDS = {"Ann": 10.0, "Bob": 12.0, "Cy": 1.0}
LONG, SHORT = "a long and careful answer", "short"


def labelled_queue(studio: Studio) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    answers = [(LONG, SHORT)] * 3 + [(SHORT, LONG)] * 3
    queue = imported_queue(
        studio, [(f"{a} {i}", f"{b} {i}") for i, (a, b) in enumerate(answers)], labels_per_item=3
    )
    items = studio.ok(studio.tget(f"/feedback/queues/{queue['id']}/items"))["data"]
    for name, choices in CHOICES.items():
        person = studio.labeller(name)
        for item, choice in zip(items, choices, strict=True):
            shown = person.ok(person.tget(f"/feedback/queues/{queue['id']}/next"))["item"]
            assert shown["id"] == item["id"]
            if choice in ("answer_1", "answer_2"):
                person.press(shown, item[choice], seconds=SECONDS[name])
            else:
                body = {"choice": choice, "seconds": SECONDS[name]}
                person.ok(person.tpost(f"/feedback/items/{item['id']}/labels", json=body))
    return queue, items


def test_quality_numbers_by_hand(studio: Studio) -> None:
    queue, _ = labelled_queue(studio)
    report = studio.ok(studio.tget(f"/feedback/queues/{queue['id']}/quality"))
    assert (report["labels"], report["labellers"], report["items_multi_labelled"]) == (18, 3, 6)
    assert report["choices"] == {"answer_1": 7, "answer_2": 7, "tie": 4, "both_bad": 0}
    # Fleiss: item agreements 1, 1/3, 1, 0, 1, 1/3 (mean 11/18); chance (7^2 + 7^2 + 4^2) / 18^2 = 114/324
    # kappa = (11/18 - 114/324) / (1 - 114/324) = 0.4
    assert report["agreement"]["fleiss_kappa"] == pytest.approx(0.4)
    assert report["agreement"]["raw_agreement"] == pytest.approx(11 / 18)
    pairs = {tuple(p["labellers"]): p for p in report["agreement"]["pairs"]}
    # Ann vs Bob agree on 5 of 6; chance (3*2 + 2*3 + 1*1) / 36 = 13/36; kappa = (30 - 13) / (36 - 13)
    assert pairs[("Ann", "Bob")]["cohen_kappa"] == pytest.approx(17 / 23)
    assert (
        pairs[("Ann", "Bob")]["raw_agreement"] == pytest.approx(5 / 6) and pairs[("Ann", "Bob")]["items"] == 6
    )
    # length: the longer answer won 3 + 2 + 0 + 1 + 2 = 8 of 14 decisive labels; p = 2 * 6476 / 2^14
    length = report["length_bias"]
    assert (length["wins"], length["decisive"]) == (8, 14)
    assert length["p_value"] == pytest.approx(2 * 6476 / 16384) and not length["significant"]
    assert report["position_bias"]["decisive"] == 14
    people = {row["name"]: row for row in report["labellers_detail"]}
    # Cy agrees with the others' verdict on 3 of 5 items (item 3's others conflict); Ann and Bob on 3 of 3
    assert (people["Cy"]["agreed"], people["Cy"]["compared_items"]) == (3, 5)
    assert people["Ann"]["agreement_with_others"] == 1.0 and people["Bob"]["compared_items"] == 3
    assert (people["Ann"]["median_seconds"], people["Cy"]["median_seconds"]) == (10.0, 1.0)
    assert people["Cy"]["flags"] == ["too_fast", "low_agreement"]
    assert people["Ann"]["flags"] == people["Bob"]["flags"] == []
    assert any(note.startswith("Cy: too fast, low agreement") for note in report["findings"])


def test_position_bias_of_a_labeller_who_always_picks_left(studio: Studio) -> None:
    queue = imported_queue(studio, [(f"one {i}", f"two {i}") for i in range(10)])
    dot = studio.labeller("Dot")
    for _ in range(10):
        item = dot.ok(dot.tget(f"/feedback/queues/{queue['id']}/next"))["item"]
        dot.ok(dot.tpost(f"/feedback/items/{item['id']}/labels", json={"choice": "left", "seconds": 5}))
    report = studio.ok(studio.tget(f"/feedback/queues/{queue['id']}/quality"))
    bias = report["position_bias"]
    # 10 of 10 on the left: p = 2 / 2^10
    assert (bias["wins"], bias["decisive"], bias["rate"]) == (10, 10, 1.0)
    assert bias["p_value"] == pytest.approx(2 / 1024) and bias["significant"]
    assert report["labellers_detail"][0]["flags"] == ["one_sided"]
    assert report["agreement"]["fleiss_kappa"] is None  # one label per item: agreement unmeasured
    assert any(
        "Left answer won 100% of 10" in note or "left answer won" in note.lower()
        for note in report["findings"]
    )


def test_exports(studio: Studio, settings: Settings) -> None:
    queue, items = labelled_queue(studio)
    export = studio.ok(studio.tpost(f"/feedback/queues/{queue['id']}/export", json={}))
    # verdicts: 0 answer_1, 1 answer_1 (2/3), 2 answer_2, 3 conflict (one vote each), 4 tie, 5 answer_2 (2/3)
    assert export["format"] == "preference" and export["file"]["purpose"] == "fine-tune"
    assert export["counts"] == {"items": 6, "exported_items": 4, "conflicts": 1, "ties": 1, "lines": 4}
    lines = [json.loads(x) for x in studio.get(f"/files/{export['file']['id']}/content").text.splitlines()]
    winners = [(x["preferred_output"][0]["content"], x["non_preferred_output"][0]["content"]) for x in lines]
    assert winners == [
        (items[0]["answer_1"], items[0]["answer_2"]),
        (items[1]["answer_1"], items[1]["answer_2"]),
        (items[2]["answer_2"], items[2]["answer_1"]),
        (items[5]["answer_2"], items[5]["answer_1"]),
    ]
    assert lines[0]["input"]["messages"] == [{"role": "user", "content": "Question 0?"}]
    assert export["file"]["filename"] == "feedback-imported-preferences.jsonl"
    strict = studio.ok(studio.tpost(f"/feedback/queues/{queue['id']}/export", json={"min_agreement": 0.7}))
    assert strict["counts"]["lines"] == 2 and strict["counts"]["low_agreement"] == 2
    unpaired = studio.ok(studio.tpost(f"/feedback/queues/{queue['id']}/export", json={"format": "unpaired"}))
    assert unpaired["counts"]["lines"] == 8
    rows = [json.loads(x) for x in studio.get(f"/files/{unpaired['file']['id']}/content").text.splitlines()]
    assert rows[0] == {
        "messages": [{"role": "user", "content": "Question 0?"}],
        "completion": items[0]["answer_1"],
        "label": True,
    }
    assert [r["label"] for r in rows] == [True, False] * 4
    empty = imported_queue(studio, [("x", "y")])
    assert (
        "nothing to export yet: items 1, unlabelled 1"
        in error(studio.tpost(f"/feedback/queues/{empty['id']}/export", json={}), 400)["message"]
    )


def test_a_pair_with_an_empty_answer_is_left_out_of_the_export(studio: Studio) -> None:
    """A model can answer with nothing, and a labeller rightly prefers the other answer; but a training
    file refuses an empty answer, so the job would fail: the export leaves the pair out and says so."""
    queue = imported_queue(studio, [("A real answer.", " "), ("Good.", "Bad.")])
    for _ in range(2):
        item = studio.ok(studio.tget(f"/feedback/queues/{queue['id']}/next"))["item"]
        studio.press(item, "Good." if "Good." in (item["left"], item["right"]) else "A real answer.")
    export = studio.ok(studio.tpost(f"/feedback/queues/{queue['id']}/export", json={}))
    assert export["counts"] == {"items": 2, "exported_items": 1, "blank_answers": 1, "lines": 1}
    unpaired = studio.ok(studio.tpost(f"/feedback/queues/{queue['id']}/export", json={"format": "unpaired"}))
    assert unpaired["counts"]["blank_answers"] == 1 and unpaired["counts"]["lines"] == 2


# --- training, comparisons, promotion ------------------------------------------------------------------------


def argv(settings: Settings, job_id: str) -> list[str]:
    return list(json.loads((settings.jobs_dir / job_id / "argv.jsonl").read_text().splitlines()[0]))


def decided_queue(studio: Studio, n: int = 12, mode: str = "pairwise") -> dict[str, Any]:
    """A queue of `n` items, each labelled once: answer_1 wins (pairwise), or alternate thumbs."""
    pairs = [(f"good answer {i}", f"bad {i}") for i in range(n)]
    if mode == "thumbs":
        queue = studio.ok(studio.tpost("/feedback/queues", json={"name": "thumbs", "mode": "thumbs"}))
        items = [{"prompt": f"Question {i}?", "answers": [a]} for i, (a, _) in enumerate(pairs)]
        studio.ok(studio.tpost(f"/feedback/queues/{queue['id']}/items", json={"items": items}))
    else:
        queue = imported_queue(studio, pairs)
    for i in range(n):
        item = studio.ok(studio.tget(f"/feedback/queues/{queue['id']}/next"))["item"]
        if mode == "thumbs":
            studio.ok(
                studio.tpost(
                    f"/feedback/items/{item['id']}/labels", json={"choice": "up" if i % 2 else "down"}
                )
            )
        else:
            studio.press(item, f"good answer {i}")
    return queue


def test_train_dpo_kto_and_a_reward_model(studio: Studio, settings: Settings) -> None:
    queue = decided_queue(studio)
    dpo = studio.ok(
        studio.tpost(
            f"/feedback/queues/{queue['id']}/train",
            json={"method": "dpo", "model": "tiny-random", "suffix": "dpo", "hyperparameters": {"beta": 0.2}},
        )
    )
    job = dpo["job"]
    assert job["method"]["type"] == "dpo" and job["training_file"] == dpo["file"]["id"]
    assert job["metadata"] == {"feedback_queue": queue["id"]} and dpo["counts"]["lines"] == 12
    kto = studio.ok(
        studio.tpost(f"/feedback/queues/{queue['id']}/train", json={"method": "kto", "model": "tiny-random"})
    )
    assert (
        kto["format"] == "unpaired" and kto["counts"]["lines"] == 24 and kto["job"]["method"]["type"] == "kto"
    )
    rm = studio.ok(
        studio.tpost(
            f"/feedback/queues/{queue['id']}/train", json={"method": "reward_model", "model": "tiny-random"}
        )
    )
    assert "beta" not in rm["job"]["method"]["reward_model"]["hyperparameters"]
    for made, recipe in ((dpo, "dpo"), (kto, "kto"), (rm, "rm")):
        done = studio.wait_status(made["job"]["id"], *TERMINAL)
        assert done["status"] == "succeeded", done
        command = argv(settings, done["id"])
        assert command[0] == recipe
    assert argv(settings, dpo["job"]["id"])[argv(settings, dpo["job"]["id"]).index("--beta") + 1] == "0.2"
    listed = {j["id"]: j["method"]["type"] for j in studio.get("/fine_tuning/jobs").json()["data"]}
    assert listed[kto["job"]["id"]] == "kto" and listed[rm["job"]["id"]] == "reward_model"

    reward_model = studio.wait_status(rm["job"]["id"], "succeeded")["fine_tuned_model"]
    chat = {"model": reward_model, "messages": [{"role": "user", "content": "Hi"}]}
    refused = error(studio.post("/chat/completions", json=chat), 400)
    assert refused["code"] == "model_not_chat" and "reward model" in refused["message"]
    assert (
        error(studio.tpost("/projects/current_model", json={"model": reward_model}), 400)["code"]
        == "model_not_chat"
    )
    body = {"method": "dpo", "model": reward_model}
    assert (
        error(studio.tpost(f"/feedback/queues/{queue['id']}/train", json=body), 400)["code"]
        == "model_not_chat"
    )
    # OpenAI's endpoint stays OpenAI's: Tunery's method types go through /tunery/v1 only
    openai = {"model": "tiny-random", "training_file": kto["file"]["id"], "method": {"type": "kto"}}
    assert error(studio.post("/fine_tuning/jobs", json=openai), 400)["param"] == "method.type"


def test_the_held_out_split_by_hand() -> None:
    def pair(q: str) -> dict[str, Any]:
        return {"input": {"messages": [{"role": "user", "content": q}]}, "preferred_output": [], "x": q}

    def rated(q: str, up: bool) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": q}], "completion": q, "label": up}

    lines = [pair(q) for q in "abcde"]
    train, valid = held_out_split(lines, 0.4, seed=1)
    assert len(valid) == 2 and len(train) == 3 and sorted(x["x"] for x in train + valid) == list("abcde")
    assert held_out_split(lines, 0.4, seed=1) == (train, valid)  # the seed decides
    assert held_out_split(lines, 0.0, seed=1) == (lines, [])
    assert held_out_split(lines, 0.01, seed=1)[1] != []  # at least one prompt held out ...
    assert len(held_out_split(lines[:2], 0.5, seed=1)[0]) == 1  # ... and at least one kept
    assert held_out_split(lines[:1], 0.5, seed=1) == (lines[:1], [])  # one prompt: nothing to hold out
    unpaired = [rated(q, up) for q in "abcd" for up in (True, False)]
    train, valid = held_out_split(unpaired, 0.5, seed=3)
    assert len(train) == len(valid) == 4  # a prompt's two lines stay together
    assert not {x["completion"] for x in train} & {x["completion"] for x in valid}


def test_held_out_prompts_and_seeds(studio: Studio, settings: Settings, fake: FakeInference) -> None:
    """`validation_fraction` holds out prompts (with every line they make) as the job's validation file,
    drawn with `seed`, which the job gets too; a queue's or a comparison's `seed` seeds item k's answers
    with seed + k."""
    queue = decided_queue(studio, n=16)
    path = f"/feedback/queues/{queue['id']}/train"

    def content(file_id: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in studio.get(f"/files/{file_id}/content").text.splitlines()]

    def prompts(lines: list[dict[str, Any]]) -> set[str]:
        return {json.dumps(x["input"]["messages"] if "input" in x else x["messages"]) for x in lines}

    body = {"method": "dpo", "model": "tiny-random", "validation_fraction": 0.25, "seed": 7}
    made = studio.ok(studio.tpost(path, json=body))
    assert (made["counts"]["training_lines"], made["counts"]["validation_lines"]) == (12, 4)
    job = made["job"]
    assert job["validation_file"] == made["validation_file"]["id"] and job["seed"] == 7
    train, valid = content(job["training_file"]), content(job["validation_file"])
    assert len(train) == 12 and len(valid) == 4 and not prompts(train) & prompts(valid)
    again = studio.ok(studio.tpost(path, json=body))  # the same seed, the same split
    assert content(again["job"]["validation_file"]) == valid
    other = studio.ok(studio.tpost(path, json=body | {"seed": 8}))
    assert content(other["job"]["validation_file"]) != valid
    kto = studio.ok(studio.tpost(path, json=body | {"method": "kto"}))  # two lines per prompt, kept together
    assert (kto["counts"]["training_lines"], kto["counts"]["validation_lines"]) == (24, 8)
    kto_train, kto_valid = content(kto["job"]["training_file"]), content(kto["job"]["validation_file"])
    assert prompts(kto_valid) == prompts(valid) and not prompts(kto_train) & prompts(kto_valid)
    plain = studio.ok(studio.tpost(path, json={"method": "dpo", "model": "tiny-random"}))
    assert plain["job"]["validation_file"] is None and plain["validation_file"] is None
    for started in (made, kto):  # the job trains with --valid on the held-out file
        done = studio.wait_status(started["job"]["id"], *TERMINAL)
        assert done["status"] == "succeeded", done
        command = argv(settings, done["id"])
        held = Path(command[command.index("--valid") + 1]).read_text().splitlines()
        assert [json.loads(x) for x in held] == content(done["validation_file"])
    small = decided_queue(studio, n=12)  # 9 prompts left to train on: too few
    refused = error(studio.tpost(f"/feedback/queues/{small['id']}/train", json=body), 400)
    assert "held-out" in refused["message"] and refused["code"] == "invalid_n_examples"
    for fraction in (-0.1, 0.6):
        assert error(studio.tpost(path, json=body | {"validation_fraction": fraction}), 400)["param"] == (
            "validation_fraction"
        )

    prompts_file = studio.upload(jsonl(PROMPTS), "prompts.jsonl")
    fake.requests.clear()
    seeded = {"name": "seeded", "prompts_file": prompts_file, "model_a": "tiny-random", "seed": 100}
    queue = studio.ok(studio.tpost("/feedback/queues", json=seeded))
    assert studio.wait_queue(queue["id"])["seed"] == 100
    assert sorted(r["params"]["seed"] for r in fake.requests) == [100, 101, 102, 103]
    fake.requests.clear()
    versus = {"candidate": "tiny-random", "baseline": "smollm2-135m-instruct", "prompts_file": prompts_file}
    comparison = studio.ok(studio.tpost("/comparisons", json=versus | {"seed": 5}))
    studio.wait_queue(comparison["id"])
    by_model = {(r["model"], r["params"]["seed"]) for r in fake.requests}
    assert by_model == {(m, s) for m in ("tiny-random", "smollm2-135m-instruct") for s in (5, 6, 7, 8)}


def test_a_reward_model_is_no_starting_point_on_either_route(studio: Studio) -> None:
    """One create_job for both job-creating routes: OpenAI's endpoint, which used to start a DPO job from
    a reward model, now refuses it as the studio always has, with the same error."""
    queue = decided_queue(studio)
    rm = studio.ok(
        studio.tpost(
            f"/feedback/queues/{queue['id']}/train", json={"method": "reward_model", "model": "tiny-random"}
        )
    )
    reward_model = studio.wait_status(rm["job"]["id"], "succeeded")["fine_tuned_model"]
    from_studio = error(
        studio.tpost(f"/feedback/queues/{queue['id']}/train", json={"method": "dpo", "model": reward_model}),
        400,
    )
    openai = {"model": reward_model, "training_file": rm["file"]["id"], "method": {"type": "dpo"}}
    from_openai = error(studio.post("/fine_tuning/jobs", json=openai), 400)
    assert from_openai == from_studio
    assert from_openai["code"] == "model_not_chat" and from_openai["param"] == "model"
    assert reward_model in from_openai["message"] and "reward model" in from_openai["message"]
    jobs = studio.get("/fine_tuning/jobs").json()["data"]
    assert [j["id"] for j in jobs] == [rm["job"]["id"]]  # nothing was created on either route


def test_train_refuses_too_little_or_the_wrong_data(studio: Studio) -> None:
    small = decided_queue(studio, n=4)
    body = {"method": "dpo", "model": "tiny-random"}
    message = error(studio.tpost(f"/feedback/queues/{small['id']}/train", json=body), 400)["message"]
    assert "4 training examples" in message and "at least 10" in message
    thumbs = decided_queue(studio, n=12, mode="thumbs")
    assert (
        "train KTO"
        in error(studio.tpost(f"/feedback/queues/{thumbs['id']}/train", json=body), 400)["message"]
    )
    kto = studio.ok(
        studio.tpost(f"/feedback/queues/{thumbs['id']}/train", json={"method": "kto", "model": "tiny-random"})
    )
    assert (
        kto["counts"]["lines"] == 12
        and studio.wait_status(kto["job"]["id"], *TERMINAL)["status"] == "succeeded"
    )


def test_compare_a_finished_job_blind_and_promote(studio: Studio, globex: Studio, monkeypatch) -> None:
    queue = decided_queue(studio)
    made = studio.ok(
        studio.tpost(f"/feedback/queues/{queue['id']}/train", json={"method": "dpo", "model": "tiny-random"})
    )
    job = studio.wait_status(made["job"]["id"], "succeeded")
    candidate = job["fine_tuned_model"]

    comparison = studio.ok(studio.tpost("/comparisons", json={"job": job["id"], "max_prompts": 10}))
    assert (comparison["candidate"], comparison["baseline"]) == (candidate, "tiny-random")
    assert comparison["name"] == "Blind comparison 1" and comparison["job_id"] == job["id"]
    assert comparison["result"]["recommendation"] == "no_data"
    studio.wait_queue(comparison["id"])
    items = studio.ok(studio.tget(f"/feedback/queues/{comparison['id']}/items"))["data"]
    assert len(items) == 10 and all(i["answer_1"].startswith(job["id"]) for i in items)  # the candidate's

    eve = studio.labeller("Eve")
    seen = eve.ok(eve.tget("/feedback/queues"))["data"]
    assert [q["kind"] for q in seen] == ["comparison", "labelling"] and candidate not in json.dumps(seen)
    for i in range(10):
        item = eve.ok(eve.tget(f"/feedback/queues/{comparison['id']}/next"))["item"]
        answers = {x["id"]: x for x in items}[item["id"]]
        eve.press(item, answers["answer_1"] if i else answers["answer_2"])  # the candidate wins 9 of 10
    result = studio.ok(studio.tget(f"/comparisons/{comparison['id']}"))["result"]
    assert (result["wins"], result["losses"], result["decisive"]) == (9, 1, 10)
    assert result["win_rate"] == 0.9 and result["interval"][0] == pytest.approx(0.5958, abs=1e-3)
    assert result["recommendation"] == "promote" and "lies above 50%" in result["reason"]

    assert studio.ok(studio.tget("/projects/current_model"))["model"] is None
    promoted = studio.ok(
        studio.tpost("/projects/current_model", json={"model": candidate, "comparison_id": comparison["id"]})
    )
    assert promoted["model"] == candidate and promoted["history"][-1]["comparison_id"] == comparison["id"]
    assert studio.ok(studio.tget(f"/comparisons/{comparison['id']}"))["promoted"] is True
    monkeypatch.setattr(comparisons, "HISTORY_KEPT", 3)  # the row keeps the newest; the audit log all
    for model in ("tiny-random", candidate, "tiny-random"):
        studio.ok(studio.tpost("/projects/current_model", json={"model": model}))
    history = studio.ok(studio.tget("/projects/current_model"))["history"]
    assert [(h["model"], h["previous"]) for h in history] == [
        ("tiny-random", candidate),
        (candidate, "tiny-random"),
        ("tiny-random", candidate),
    ]
    back = {"model": candidate, "comparison_id": comparison["id"]}
    assert studio.ok(studio.tpost("/projects/current_model", json=back))["model"] == candidate
    assert globex.ok(globex.tget("/projects/current_model"))["model"] is None
    assert (
        error(globex.tpost("/projects/current_model", json={"model": candidate}), 404)["code"]
        == "model_not_found"
    )
    assert error(globex.tget(f"/comparisons/{comparison['id']}"), 404)["code"] == "comparison_not_found"
    # /v1/models stays OpenAI's: no mark on the current model
    assert {tuple(sorted(m)) for m in studio.get("/models").json()["data"]} == {
        ("created", "id", "object", "owned_by")
    }
    # the next comparison from a job is against the current model by default
    again = studio.ok(
        studio.tpost("/comparisons", json={"job": job["id"], "baseline": "tiny-random", "max_prompts": 2})
    )
    assert again["name"] == "Blind comparison 2"
    assert error(studio.tpost("/comparisons", json={"candidate": candidate}), 400)["param"] == "baseline"
    same = {"candidate": candidate, "baseline": candidate, "prompts_file": job["training_file"]}
    assert error(studio.tpost("/comparisons", json=same), 400)["param"] == "baseline"
    imported = {"items": [{"prompt": "x", "answers": ["a", "b"]}]}
    refused = studio.tpost(f"/feedback/queues/{again['id']}/items", json=imported)
    assert "two models" in error(refused, 400)["message"]


def test_a_winner_with_safety_flags_is_reviewed_not_promoted(
    studio: Studio, globex: Studio, monkeypatch
) -> None:
    """Labellers preferring a model's answers says nothing of the safety evaluations its run got worse on:
    such a winner is `review_safety`, with the flags, whether the comparison names its job or its model;
    another project can neither compare that model nor read its flags."""
    flag = "safety: the tuned model declines 56% of red-team prompts, the base 72%"
    monkeypatch.setenv("FAKE_SAFETY_FLAGS", json.dumps([flag]))
    queue = decided_queue(studio)
    made = studio.ok(
        studio.tpost(f"/feedback/queues/{queue['id']}/train", json={"method": "dpo", "model": "tiny-random"})
    )
    job = studio.wait_status(made["job"]["id"], "succeeded")
    comparison = studio.ok(studio.tpost("/comparisons", json={"job": job["id"], "max_prompts": 10}))
    assert comparison["result"]["safety_flags"] == [flag]
    studio.wait_queue(comparison["id"])
    items = {i["id"]: i for i in studio.ok(studio.tget(f"/feedback/queues/{comparison['id']}/items"))["data"]}
    for i in range(10):
        item = studio.ok(studio.tget(f"/feedback/queues/{comparison['id']}/next"))["item"]
        studio.press(item, items[item["id"]]["answer_1" if i else "answer_2"])  # the candidate wins 9 of 10
    result = studio.ok(studio.tget(f"/comparisons/{comparison['id']}"))["result"]
    assert result["interval"][0] > 0.5 and result["recommendation"] == "review_safety"
    assert "lies above 50%" in result["reason"] and flag in result["reason"]

    by_name = {
        "candidate": job["fine_tuned_model"],
        "baseline": "tiny-random",
        "prompts_file": job["training_file"],
    }
    named = studio.ok(studio.tpost("/comparisons", json={**by_name, "max_prompts": 2}))
    assert named["job_id"] is None and named["result"]["safety_flags"] == [flag]
    theirs = {**by_name, "prompts_file": globex.upload(jsonl([{"prompt": "Q?"}]), "p.jsonl")}
    assert error(globex.tpost("/comparisons", json=theirs), 404)["param"] == "candidate"
    plain = {**by_name, "candidate": "smollm2-135m-instruct", "max_prompts": 2}  # no run behind it
    assert studio.ok(studio.tpost("/comparisons", json=plain))["result"]["safety_flags"] == []


def test_current_serves_the_model_promoted_last(studio: Studio, globex: Studio) -> None:
    """An application that asks for `current` gets each promoted model in turn; where a name is kept (the
    answer's model, a stored completion, a job, a queue, the promotion itself) it is the model's own."""
    hello = {"messages": [{"role": "user", "content": "Where is my order?"}], "store": True}
    refused = error(studio.post("/chat/completions", json={"model": "current", **hello}), 404)
    assert refused["code"] == "model_not_found" and "/tunery/v1/projects/current_model" in refused["message"]

    queue = decided_queue(studio)
    made = studio.ok(
        studio.tpost(f"/feedback/queues/{queue['id']}/train", json={"method": "dpo", "model": "tiny-random"})
    )
    job = studio.wait_status(made["job"]["id"], "succeeded")
    studio.ok(studio.tpost("/projects/current_model", json={"model": "tiny-random"}))
    answer = studio.ok(studio.post("/chat/completions", json={"model": "current", **hello}))
    assert answer["model"] == "tiny-random" and answer["choices"][0]["message"]["content"].startswith(
        "tiny-random"
    )

    promoted = studio.ok(studio.tpost("/projects/current_model", json={"model": "current"}))
    assert promoted["model"] == "tiny-random"  # promoting `current` again keeps the name it stands for
    studio.ok(studio.tpost("/projects/current_model", json={"model": job["fine_tuned_model"]}))
    answer = studio.ok(studio.post("/chat/completions", json={"model": "current", **hello}))
    assert answer["model"] == job["fine_tuned_model"]
    assert answer["choices"][0]["message"]["content"].startswith(job["id"])  # the fine-tuned model answered
    with studio.client.stream(
        "POST",
        "/v1/chat/completions",
        headers=studio.headers,
        json={"model": "current", "stream": True, **hello},
    ) as stream:
        chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert {c["model"] for c in chunks} == {job["fine_tuned_model"]}
    stored = studio.ok(studio.get("/chat/completions", params={"order": "desc", "limit": 1}))["data"][0]
    assert stored["id"] == chunks[0]["id"] and stored["model"] == job["fine_tuned_model"]
    by_current = studio.ok(studio.get("/chat/completions", params={"model": "current"}))["data"]
    assert [c["id"] for c in by_current] == [
        answer["id"],
        stored["id"],
    ]  # the current model's, not the base's
    studio.ok(studio.tpost("/ratings", json={"completion_id": answer["id"], "rating": "up"}))
    exported = studio.ok(studio.tpost("/ratings/export", json={"model": "current"}))
    assert exported["counts"]["lines"] == 1  # the current model's ratings
    assert studio.ok(studio.get("/models/current"))["id"] == job["fine_tuned_model"]
    assert error(studio.delete("/models/current"), 400)["param"] == "model"  # only by its own name

    prompts = studio.upload(jsonl([{"prompt": "Q?"}]), "prompts.jsonl")
    new_queue = studio.ok(
        studio.tpost(
            "/feedback/queues",
            json={"name": "q", "prompts_file": prompts, "model_a": "current", "model_b": "tiny-random"},
        )
    )
    assert new_queue["model_a"] == job["fine_tuned_model"]
    versus = {"candidate": "tiny-random", "baseline": "current", "prompts_file": prompts}
    assert studio.ok(studio.tpost("/comparisons", json=versus))["baseline"] == job["fine_tuned_model"]
    same = {"candidate": job["fine_tuned_model"], "baseline": "current", "prompts_file": prompts}
    assert error(studio.tpost("/comparisons", json=same), 400)["param"] == "baseline"
    training = job["training_file"]
    again = studio.ok(studio.post("/fine_tuning/jobs", json={"model": "current", "training_file": training}))
    assert again["model"] == job["fine_tuned_model"]
    # another project has no current model, and acme's is not its
    assert (
        error(globex.post("/chat/completions", json={"model": "current", **hello}), 404)["code"]
        == "model_not_found"
    )


def test_comparison_recommendations(studio: Studio) -> None:
    prompts = studio.upload(jsonl([{"prompt": f"Q{i}?"} for i in range(6)]), "prompts.jsonl")
    body = {
        "candidate": "tiny-random",
        "baseline": "smollm2-135m-instruct",
        "prompts_file": prompts,
        "max_prompts": 6,
    }
    comparison = studio.ok(studio.tpost("/comparisons", json=body))
    studio.wait_queue(comparison["id"])
    items = {i["id"]: i for i in studio.ok(studio.tget(f"/feedback/queues/{comparison['id']}/items"))["data"]}
    for i in range(6):
        item = studio.ok(studio.tget(f"/feedback/queues/{comparison['id']}/next"))["item"]
        if i == 5:
            studio.ok(studio.tpost(f"/feedback/items/{item['id']}/labels", json={"choice": "tie"}))
        else:
            studio.press(item, items[item["id"]]["answer_2" if i else "answer_1"])  # baseline wins 4 of 5
    result = studio.ok(studio.tget(f"/comparisons/{comparison['id']}"))["result"]
    assert (result["wins"], result["losses"], result["ties"]) == (1, 4, 1)
    # Wilson interval of 1/5: 0.036-0.624, which holds 0.5
    assert result["recommendation"] == "inconclusive" and result["interval"][1] == pytest.approx(
        0.6245, abs=1e-3
    )


# --- ratings of stored completions -------------------------------------------------------------------------


def test_applications_rate_stored_completions(studio: Studio, globex: Studio) -> None:
    hello = [{"role": "user", "content": "Where is my order?"}]
    stored = studio.ok(
        studio.post("/chat/completions", json={"model": "tiny-random", "messages": hello, "store": True})
    )
    unstored = studio.ok(studio.post("/chat/completions", json={"model": "tiny-random", "messages": hello}))
    with studio.client.stream(
        "POST",
        "/v1/chat/completions",
        headers=studio.headers,
        json={"model": "tiny-random", "messages": hello, "stream": True, "store": True},
    ) as stream:
        chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    streamed = chunks[0]["id"]

    up = studio.ok(
        studio.tpost("/ratings", json={"completion_id": stored["id"], "rating": "up", "comment": "spot on"})
    )
    assert (up["rating"], up["comment"], up["choice_index"]) == ("up", "spot on", 0)
    changed = studio.ok(studio.tpost("/ratings", json={"completion_id": stored["id"], "rating": "down"}))
    assert changed["id"] == up["id"] and changed["rating"] == "down"  # the same rater changed their mind
    studio.ok(studio.tpost("/ratings", json={"completion_id": stored["id"], "rating": "up", "user": "u1"}))
    studio.ok(studio.tpost("/ratings", json={"completion_id": streamed, "rating": "up", "user": "u2"}))

    for missing, who in ((unstored["id"], studio), ("chatcmpl-nope", studio), (stored["id"], globex)):
        body = error(who.tpost("/ratings", json={"completion_id": missing, "rating": "up"}), 404)
        assert body["code"] == "completion_not_found" and "store: true" in body["message"]
    bad_index = {"completion_id": stored["id"], "rating": "up", "choice_index": 3}
    assert error(studio.tpost("/ratings", json=bad_index), 400)["param"] == "choice_index"

    listed = studio.ok(studio.tget("/ratings"))
    assert listed["totals"] == {"up": 2, "down": 1} and len(listed["data"]) == 3
    export = studio.ok(studio.tpost("/ratings/export", json={}))
    # the stored completion has one up and one down: a conflict, left out; the streamed one is up
    assert export["counts"] == {"items": 2, "conflicts": 1, "exported_items": 1, "lines": 1}
    [line] = [json.loads(x) for x in studio.get(f"/files/{export['file']['id']}/content").text.splitlines()]
    assert line == {"messages": hello, "completion": "tiny-random says: Where is my order?", "label": True}
    assert (
        "at least 10"
        in error(studio.tpost("/ratings/train", json={"train_model": "tiny-random"}), 400)["message"]
    )
    assert error(globex.tpost("/ratings/export", json={}), 400)["code"] == "nothing_to_export"
    for i in range(10):
        body = {"model": "tiny-random", "messages": [{"role": "user", "content": f"Q{i}?"}], "store": True}
        made = studio.ok(studio.post("/chat/completions", json=body))
        studio.ok(
            studio.tpost("/ratings", json={"completion_id": made["id"], "rating": "up" if i % 2 else "down"})
        )
    trained = studio.ok(studio.tpost("/ratings/train", json={"train_model": "tiny-random"}))
    assert trained["job"]["method"]["type"] == "kto" and trained["counts"]["lines"] == 11
    assert studio.wait_status(trained["job"]["id"], *TERMINAL)["status"] == "succeeded"


def test_queue_sizes_are_bounded_and_prompts_read_a_line_at_a_time(studio: Studio) -> None:
    """A 300,000-item queue made every labeller's next item slow; a 64 MB prompts file was read whole into
    the API process for a queue of a few prompts; an item added to a queue of one took its position."""
    from tunery.server.feedback import MAX_PROMPTS

    queue = imported_queue(studio, [("a", "b")])
    more = studio.ok(
        studio.tpost(
            f"/feedback/queues/{queue['id']}/items", json={"items": [{"prompt": "p", "answers": ["c", "d"]}]}
        )
    )
    items = studio.ok(studio.tget(f"/feedback/queues/{queue['id']}/items"))["data"]
    assert [i["position"] for i in items] == [0, 1], more
    batch = {"items": [{"prompt": f"p{k}", "answers": ["x", "y"]} for k in range(MAX_PROMPTS - 1)]}
    r = studio.tpost(f"/feedback/queues/{queue['id']}/items", json=batch)
    assert error(r, 400)["code"] == "too_many_items"
    long_line = json.dumps({"prompt": "x" * (2**20 + 10)})
    prompts = studio.upload((long_line + "\n").encode(), "long.jsonl")
    body = {"name": "q", "prompts_file": prompts, "model_a": "tiny-random"}
    assert "longer than 1 MB" in error(studio.tpost("/feedback/queues", json=body), 400)["message"]
