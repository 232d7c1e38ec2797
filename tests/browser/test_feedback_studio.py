"""The feedback studio in headless Chromium against a live `tunery serve` (its own, with the real CLI and
inference worker on tiny-random).

In file order, sharing the server: the admin makes a queue from an uploaded prompts file in the browser
(answers written by tiny-random through the real worker) and adds two labellers; two labellers label a
queue of readable support answers with the keyboard only (comment, undo, a browser closed midway); the
admin reads the quality page, exports the preferences and starts a DPO job from them; the finished job
is compared blind, labelled, and promoted. Screenshots go to SCREENSHOTS (conftest.py), `studio-*`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import login
from tests.conftest import BAD_ANSWERS, TOPICS, write_jsonl

pytestmark = pytest.mark.browser

expect: Any = None  # playwright's expect, imported once the browser fixture has checked it is installed
N_ITEMS = 16


@pytest.fixture(scope="module", autouse=True)
def _expect(browser: Any) -> None:
    global expect
    from playwright.sync_api import expect as playwright_expect

    expect = playwright_expect
    expect.set_options(timeout=20_000)


class Admin:
    """The admin's key on the Tunery API (what the page does is driven through the page itself)."""

    def __init__(self, live: dict[str, Any]) -> None:
        self.http = httpx.Client(
            base_url=live["base"], headers={"Authorization": f"Bearer {live['key']}"}, timeout=30
        )

    def get(self, path: str) -> Any:
        r = self.http.get(path)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        r = self.http.post(path, json=body)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def admin(live: dict[str, Any]) -> Admin:
    return Admin(live)


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    """What one test leaves for the next: labellers' keys, queue and job ids."""
    return {}


GOOD = {f"{q} (#{i})": a for i, (q, a) in enumerate(TOPICS * 2)}


@pytest.fixture(scope="module")
def readable_queue(admin: Admin) -> dict[str, Any]:
    """A queue of support answers to label: the shop's answer against a rude, rambling or wrong one."""
    queue = admin.post(
        "/tunery/v1/feedback/queues",
        {
            "name": "Support answers, June",
            "labels_per_item": 2,
            "instructions": "Which answer would you rather get as a customer? Correct and polite beats short.",
        },
    )
    items = [
        {
            "messages": [
                {"role": "system", "content": "You are Northwind Bikes' support assistant."},
                {"role": "user", "content": q},
            ],
            "answers": [GOOD[q], BAD_ANSWERS[i % len(BAD_ANSWERS)]]
            if i % 2
            else [BAD_ANSWERS[i % len(BAD_ANSWERS)], GOOD[q]],
            "models": ["support-v1", "support-v0"] if i % 2 else ["support-v0", "support-v1"],
        }
        for i, q in enumerate(list(GOOD)[:N_ITEMS])
    ]
    admin.post(f"/tunery/v1/feedback/queues/{queue['id']}/items", {"items": items})
    return queue


def test_the_admin_makes_a_queue_from_a_file_and_adds_labellers(
    page: Any, live: dict[str, Any], admin: Admin, state: dict[str, Any], screenshots: Any, tmp_path: Path
) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q, _ in TOPICS[:3]])
    login(page, live["base"], live["key"])
    page.click("#topbar >> text=Feedback")
    expect(page.locator("h1")).to_have_text("Feedback studio")
    page.click("#new-queue-button")
    page.fill("#queue-name", "Tiny answers")
    page.set_input_files("#queue-upload", str(prompts))
    page.select_option("#queue-model-a", "tiny-random")
    page.fill("#queue-max-tokens", "16")
    page.fill("#queue-instructions", "Pick the answer that reads better.")
    screenshots(page, "studio-01-new-queue")
    page.click("#create-queue")
    expect(page.locator(".job-header h1")).to_contain_text("Tiny answers")
    # the real inference worker writes two samples of tiny-random per prompt
    expect(page.locator(".job-header h1 .badge")).to_have_text("ready", timeout=120_000)
    expect(page.locator(".facts")).to_contain_text("3 of 3 written")
    screenshots(page, "studio-02-queue-generated")

    page.goto(f"{live['base']}#/feedback")
    for name in ("Ana", "Ben"):
        page.fill("#labeller-name", name)
        page.click("#add-labeller")
        expect(page.locator(".key-once")).to_contain_text(name)
        state[name] = page.locator(".key-once code").inner_text().strip()
        assert state[name].startswith("sk-tunery-")
    expect(page.locator(".labeller-list")).to_contain_text("Ben")
    screenshots(page, "studio-03-studio-home")
    assert sorted(x["name"] for x in admin.get("/tunery/v1/labellers")["data"]) == ["Ana", "Ben"]


def label_item(page: Any, prefer_good: bool = True, key_left: str = "a", key_right: str = "b") -> None:
    """Read the two answers and press the key for the shop's answer (or the other one)."""
    expect(page.locator("#label-prompt")).to_be_visible()
    question = page.locator("#label-prompt .turn .content").last.inner_text()
    left = page.locator('[data-side="left"] .answer-body').inner_text()
    good = GOOD[question]
    page.keyboard.press(key_left if (left == good) == prefer_good else key_right)


def count(page: Any) -> str:
    return page.locator("#label-count").inner_text()


def test_two_labellers_label_with_the_keyboard(
    browser: Any,
    live: dict[str, Any],
    admin: Admin,
    readable_queue: dict[str, Any],
    state: dict[str, Any],
    screenshots: Any,
) -> None:
    queue_id = readable_queue["id"]
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    login(page, live["base"], state["Ana"])
    # a labeller sees only what there is to label: no jobs, no playground
    expect(page.locator("h1")).to_have_text("Hello, Ana")
    assert page.locator("#topbar .nav a").all_inner_texts() == ["Feedback"]
    screenshots(page, "studio-04-labeller-home")
    page.locator(".queue-card", has_text="Support answers, June").locator("text=Start labelling").click()
    expect(page.locator("#label-count")).to_have_text(f"0 / {N_ITEMS} done")
    screenshots(page, "studio-05-labelling")
    label_item(page)
    expect(page.locator("#label-count")).to_have_text(f"1 / {N_ITEMS} done")
    # a comment: C, type, Enter keeps it, then the choice key saves both
    page.keyboard.press("c")
    page.keyboard.type("The other one is rude.")
    page.keyboard.press("Enter")
    label_item(page, key_left="1", key_right="2")
    expect(page.locator("#label-count")).to_have_text(f"2 / {N_ITEMS} done")
    # undo: back to the second item, which shows the choice; a tie replaces it
    page.keyboard.press("u")
    expect(page.locator(".choice.selected")).to_have_count(1)
    screenshots(page, "studio-06-undo")
    page.keyboard.press("t")
    expect(page.locator(".label-status")).to_have_text("Label changed.")
    expect(page.locator(".choice.selected")).to_have_count(0)  # the next new item
    expect(page.locator("#label-count")).to_have_text(f"2 / {N_ITEMS} done")
    label_item(page)
    expect(page.locator("#label-count")).to_have_text(f"3 / {N_ITEMS} done")
    context.close()  # the browser closes mid-queue

    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    login(page, live["base"], state["Ana"])
    page.goto(f"{live['base']}#/feedback/{queue_id}/label")
    expect(page.locator("#label-count")).to_have_text(f"3 / {N_ITEMS} done")  # nothing was lost
    for i in range(3, N_ITEMS):
        label_item(page, prefer_good=i != 5)
        expect(page.locator("#label-count")).to_have_text(f"{i + 1} / {N_ITEMS} done")
    expect(page.locator("#label-done")).to_be_visible()
    screenshots(page, "studio-07-done")
    context.close()

    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    login(page, live["base"], state["Ben"])
    page.goto(f"{live['base']}#/feedback/{queue_id}/label")
    for i in range(N_ITEMS):
        if i == 7:
            page.keyboard.press("x")  # both bad
        else:
            label_item(page, prefer_good=i not in (2, 9))
        expect(page.locator("#label-count")).to_have_text(f"{i + 1} / {N_ITEMS} done")
    expect(page.locator("#label-done")).to_be_visible()
    context.close()

    items = admin.get(f"/tunery/v1/feedback/queues/{queue_id}/items")["data"]
    labels = {(i["position"], x["labeller"]): x for i in items for x in i["labels"]}
    assert len(labels) == 2 * N_ITEMS
    assert labels[(1, "Ana")]["choice"] == "tie" and labels[(1, "Ana")]["comment"] == "The other one is rude."
    assert labels[(7, "Ben")]["choice"] == "both_bad"
    good_side = {i["position"]: "answer_1" if i["model_1"] == "support-v1" else "answer_2" for i in items}
    assert labels[(0, "Ana")]["choice"] == good_side[0] and labels[(2, "Ben")]["choice"] != good_side[2]
    state["queue"] = queue_id


def test_quality_export_and_a_dpo_job(
    page: Any, live: dict[str, Any], admin: Admin, state: dict[str, Any], screenshots: Any
) -> None:
    login(page, live["base"], live["key"])
    page.goto(f"{live['base']}#/feedback/{state['queue']}")
    expect(page.locator("#labellers-table")).to_contain_text("Ana")
    expect(page.locator(".stat-tile").first).to_contain_text(str(2 * N_ITEMS))
    screenshots(page, "studio-08-quality", full_page=True)
    report = admin.get(f"/tunery/v1/feedback/queues/{state['queue']}/quality")
    assert report["labels"] == 2 * N_ITEMS and report["agreement"]["fleiss_kappa"] is not None

    page.click("#export-button")
    expect(page.locator("#export-result")).to_contain_text("lines (preference)")
    file_id = page.locator("#export-result code").inner_text().strip()
    content = admin.http.get(f"/v1/files/{file_id}/content").text.splitlines()
    pairs = [json.loads(line) for line in content]
    assert pairs and all(set(p) == {"input", "preferred_output", "non_preferred_output"} for p in pairs)
    assert all(p["preferred_output"][0]["content"] in GOOD.values() for p in pairs)  # the labellers' verdicts

    page.select_option("#train-model", "tiny-random")
    page.click('button[data-method="dpo"]')
    expect(page.locator("#new-job")).to_be_visible()
    screenshots(page, "studio-09-dpo-started")
    job_id = page.locator("#new-job").inner_text().strip()
    job = admin.get(f"/v1/fine_tuning/jobs/{job_id}")
    assert job["method"]["type"] == "dpo" and job["metadata"] == {"feedback_queue": state["queue"]}
    page.click("#new-job")
    expect(page.locator(".job-header h1")).to_be_visible()
    deadline = time.monotonic() + 300
    while admin.get(f"/v1/fine_tuning/jobs/{job_id}")["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(1)
    done = admin.get(f"/v1/fine_tuning/jobs/{job_id}")
    assert done["status"] == "succeeded", done
    state["job"] = done


def test_compare_the_new_model_blind_and_promote_it(
    browser: Any, live: dict[str, Any], admin: Admin, state: dict[str, Any], screenshots: Any
) -> None:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    login(page, live["base"], live["key"])
    page.goto(f"{live['base']}#/comparisons?job={state['job']['id']}")
    page.locator(f'button[data-job="{state["job"]["id"]}"]').click()
    expect(page.locator(".job-header h1")).to_contain_text("Blind comparison 1")
    comparison_id = page.url.rsplit("/", 1)[1]
    deadline = time.monotonic() + 180
    while admin.get(f"/tunery/v1/comparisons/{comparison_id}")["status"] == "generating":
        assert time.monotonic() < deadline
        time.sleep(1)
    items = {i["id"]: i for i in admin.get(f"/tunery/v1/feedback/queues/{comparison_id}/items")["data"]}
    context.close()

    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    login(page, live["base"], state["Ben"])
    page.goto(f"{live['base']}#/feedback/{comparison_id}/label")
    for n in range(len(items)):
        expect(page.locator("#label-count")).to_have_text(f"{n} / {len(items)} done")
        shown = admin.http.get(
            f"/tunery/v1/feedback/queues/{comparison_id}/next",
            headers={"Authorization": f"Bearer {state['Ben']}"},
        ).json()["item"]
        candidate_left = shown["left"] == items[shown["id"]]["answer_1"]
        page.keyboard.press("a" if candidate_left == (n != 0) else "b")  # the candidate wins all but one
    expect(page.locator("#label-done")).to_be_visible()
    context.close()

    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    login(page, live["base"], live["key"])
    page.goto(f"{live['base']}#/comparisons/{comparison_id}")
    expect(page.locator("#win-rate")).to_be_visible()
    result = admin.get(f"/tunery/v1/comparisons/{comparison_id}")["result"]
    assert (result["wins"], result["losses"]) == (len(items) - 1, 1)
    screenshots(page, "studio-10-comparison")
    page.click("#promote")
    page.locator("dialog.dialog button", has_text="Promote").click()
    expect(page.locator(".job-header h1 .badge")).to_have_text("current model")
    assert admin.get("/tunery/v1/projects/current_model")["model"] == state["job"]["fine_tuned_model"]
    page.goto(f"{live['base']}#/comparisons")
    expect(page.locator("#current-model")).to_have_text(state["job"]["fine_tuned_model"])
    screenshots(page, "studio-11-comparisons")
    context.close()


def test_thumbs_up_and_down_with_the_arrow_keys(
    browser: Any, live: dict[str, Any], admin: Admin, state: dict[str, Any], screenshots: Any
) -> None:
    queue = admin.post("/tunery/v1/feedback/queues", {"name": "Rate single answers", "mode": "thumbs"})
    items = [{"prompt": q, "answers": [a]} for q, a in list(GOOD.items())[:3]]
    admin.post(f"/tunery/v1/feedback/queues/{queue['id']}/items", {"items": items})
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    login(page, live["base"], state["Ana"])
    page.locator(f'.queue-card[data-queue="{queue["id"]}"] a').click()
    expect(page.locator("#label-count")).to_have_text("0 / 3 done")
    screenshots(page, "studio-12-thumbs")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: the page still fits
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshots(page, "studio-13-thumbs-phone")
    page.set_viewport_size({"width": 1360, "height": 900})
    for n, key in enumerate(("ArrowUp", "ArrowDown", "1")):
        page.keyboard.press(key)
        expect(page.locator("#label-count")).to_have_text(f"{n + 1} / 3 done")
    context.close()
    labels = [
        x["choice"]
        for i in admin.get(f"/tunery/v1/feedback/queues/{queue['id']}/items")["data"]
        for x in i["labels"]
    ]
    assert labels == ["up", "down", "up"]
