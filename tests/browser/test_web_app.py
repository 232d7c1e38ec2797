"""The web app in headless Chromium against a live `tunery serve`, with one real tiny-random job.

The tests run in file order and share the job, so that one short training run covers all of them: it is
created when the module starts; while it validates, the login, a cancel (of a second job) and the
markdown renderer are checked; then the list shows it, it is paused and resumed from the buttons as
soon as it runs, its chart is watched growing while it trains on, it finishes with its model card, and
the playground compares its fine-tuned model with the base model. Screenshots go to SCREENSHOTS (conftest.py) to be looked at.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import openai
import pytest

from tests.browser.conftest import login
from tests.conftest import chat_lines, write_jsonl

pytestmark = pytest.mark.browser

expect: Any = None  # playwright's expect, imported once the browser fixture has checked it is installed

# 30 examples x 30 epochs at batch 1: 900 steps, ~16 s of training on a 2-core CPU; long enough to
# pause and resume it and then watch the chart grow, short enough for the default test run
EXAMPLES, EPOCHS = 30, 30
STEPS = EXAMPLES * EPOCHS
LONG = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": EPOCHS, "batch_size": 1}}}


@pytest.fixture(scope="module", autouse=True)
def _expect(browser: Any) -> None:
    global expect
    from playwright.sync_api import expect as playwright_expect

    expect = playwright_expect


@pytest.fixture(scope="module")
def client(live: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=live["api"], api_key=live["key"], max_retries=0)


@pytest.fixture(scope="module")
def job(live: dict[str, Any], client: openai.OpenAI, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The job every test looks at, created before the browser work starts so it validates meanwhile."""
    data = tmp_path_factory.mktemp("data")
    train = write_jsonl(data / "train.jsonl", chat_lines(EXAMPLES))
    valid = write_jsonl(data / "valid.jsonl", chat_lines(5))
    training = client.files.create(file=train.open("rb"), purpose="fine-tune")
    validation = client.files.create(file=valid.open("rb"), purpose="fine-tune")
    return client.fine_tuning.jobs.create(
        model="tiny-random",
        training_file=training.id,
        validation_file=validation.id,
        suffix="support",
        method=LONG,
    )


def status_badge(page: Any) -> Any:
    return page.locator(".job-header h1 .badge")


def test_login_with_a_wrong_key_then_the_right_one(
    page: Any, live: dict[str, Any], job: Any, screenshots
) -> None:
    page.goto(live["base"])
    expect(page.locator("h1")).to_have_text("Sign in")
    page.fill("#api-key", "sk-tunery-not-a-real-key")
    page.click("button[type=submit]")
    alert = page.locator(".login-form .alert-error")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("Incorrect API key provided")
    assert "not-a-real-key" not in alert.inner_text()  # the API masks the key it refuses
    screenshots(page, "01-login-wrong-key")

    page.fill("#api-key", live["key"])
    page.click("button[type=submit]")
    expect(page.locator("#topbar .project")).to_contain_text("acme")
    assert page.evaluate("sessionStorage.getItem('tunery.key')") == live["key"]
    assert page.evaluate("localStorage.getItem('tunery.key')") is None  # "remember me" was not ticked
    page.reload()  # the session survives a reload of the tab
    expect(page.locator("#topbar .project")).to_contain_text("acme")
    page.click("text=Log out")
    expect(page.locator("h1")).to_have_text("Sign in")
    assert page.evaluate("sessionStorage.getItem('tunery.key')") is None


def test_cancel_asks_first(
    page: Any, live: dict[str, Any], client: openai.OpenAI, job: Any, screenshots
) -> None:
    second = client.fine_tuning.jobs.create(model="tiny-random", training_file=job.training_file, method=LONG)
    login(page, live["base"], live["key"])
    page.goto(f"{live['base']}#/jobs/{second.id}")
    cancel = page.locator('[data-action="cancel"]')
    expect(cancel).to_be_enabled()
    cancel.click()
    dialog = page.locator("dialog.dialog")
    expect(dialog).to_be_visible()
    screenshots(page, "05-cancel-dialog")
    dialog.locator("button", has_text="Keep it").click()
    expect(dialog).to_have_count(0)
    assert client.fine_tuning.jobs.retrieve(second.id).status not in ("cancelled",)
    cancel.click()
    page.locator("dialog.dialog button", has_text="Cancel job").click()
    expect(status_badge(page)).to_have_text("cancelled")
    expect(cancel).to_be_disabled()
    assert client.fine_tuning.jobs.retrieve(second.id).status == "cancelled"


def test_the_model_card_renderer_escapes_html(page: Any, live: dict[str, Any]) -> None:
    login(page, live["base"], live["key"])
    hostile = (
        "# Card <script>window.__pwned = 1</script>\n\n"
        '<img src=x onerror="window.__pwned = 1">\n\n'
        '[a](javascript:window.__pwned=1) [b](https://example.org/?q=1&r="2") **bold <b>x</b>**\n\n'
        "| a | b |\n|---|---|\n| <i>1</i> | `|` |\n"
    )
    result = page.evaluate(
        """async (text) => {
            const { renderMarkdown } = await import("./web/js/markdown.js");
            const box = document.createElement("div");
            box.innerHTML = renderMarkdown(text);
            document.body.append(box);
            await new Promise((done) => setTimeout(done, 100));
            const elements = [...box.querySelectorAll("*")];
            return {
                tags: [...new Set(elements.map((e) => e.tagName.toLowerCase()))].sort(),
                handlers: elements.filter((e) => [...e.attributes].some((a) => a.name.startsWith("on"))).length,
                links: [...box.querySelectorAll("a")].map((a) => a.getAttribute("href")),
                pwned: window.__pwned === 1,
                text: box.textContent,
            };
        }""",
        hostile,
    )
    assert not result["pwned"] and result["handlers"] == 0
    assert not {"script", "img", "i", "b"} & set(result["tags"]), result["tags"]
    assert {"h2", "table", "strong", "code", "a"} <= set(result["tags"])
    assert result["links"] == ['https://example.org/?q=1&r="2"']
    assert "<script>" in result["text"] and "<img src=x" in result["text"]  # shown as text


def test_the_jobs_list_shows_the_job_and_follows_it(
    page: Any, live: dict[str, Any], job: Any, screenshots
) -> None:
    login(page, live["base"], live["key"])
    expect(page.locator("h1")).to_have_text("Fine-tuning jobs")
    row = page.locator(f'tr[data-job="{job.id}"]')
    expect(row).to_contain_text("support")
    expect(row).to_contain_text("tiny-random")
    expect(row).to_contain_text("supervised")
    # the list refreshes itself while the job is active: no reload between validating and running
    expect(row.locator(".badge")).to_have_text("running", timeout=120_000)
    expect(row.locator(".progress-cell")).to_contain_text(f"/ {STEPS}", timeout=30_000)
    expect(page.locator(".refresh-note")).to_contain_text("Live")
    screenshots(page, "02-jobs-list-running")
    row.locator("td").nth(3).click()  # a click anywhere on the row opens the job
    expect(page).to_have_url(re.compile(f"#/jobs/{job.id}$"))


def test_pause_and_resume_from_the_buttons(page: Any, live: dict[str, Any], job: Any, screenshots) -> None:
    login(page, live["base"], live["key"])
    page.goto(f"{live['base']}#/jobs/{job.id}")
    expect(status_badge(page)).to_have_text("running", timeout=60_000)
    # paused once it has trained a step, as a person would (the recipe has its checkpointing set up)
    expect(page.locator(".job-progress")).to_contain_text(re.compile(r"Step [1-9]\d* of"), timeout=60_000)
    pause, resume = page.locator('[data-action="pause"]'), page.locator('[data-action="resume"]')
    expect(pause).to_be_enabled()
    expect(resume).to_be_disabled()
    pause.click()
    expect(status_badge(page)).to_have_text("paused")
    expect(resume).to_be_enabled()
    expect(pause).to_be_disabled()
    expect(page.locator(".events")).to_contain_text("Job paused", timeout=60_000)  # checkpointed and stopped
    screenshots(page, "03-job-paused")
    resume.click()
    expect(status_badge(page)).to_have_text(re.compile("queued|running"))
    expect(page.locator(".events")).to_contain_text("resumed from step", timeout=60_000)
    expect(status_badge(page)).to_have_text("running")


def test_the_chart_grows_while_the_job_trains(page: Any, live: dict[str, Any], job: Any, screenshots) -> None:
    login(page, live["base"], live["key"])
    page.goto(f"{live['base']}#/jobs/{job.id}")
    expect(status_badge(page)).to_have_text("running", timeout=120_000)
    loss = page.locator('.chart-card[data-family="loss"]')
    expect(loss).to_be_visible(timeout=30_000)
    expect(loss.locator("canvas")).to_be_visible()

    def plotted() -> int:
        return int(loss.get_attribute("data-points") or 0)

    seen = [plotted()]
    deadline = time.monotonic() + 30
    while len(set(seen)) < 3 and time.monotonic() < deadline:  # two updates after the first look
        time.sleep(0.5)
        if plotted() != seen[-1]:
            seen.append(plotted())
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen
    for family in ("accuracy", "lr"):
        expect(page.locator(f'.chart-card[data-family="{family}"]')).to_be_visible()
    expect(loss.locator(".u-legend")).to_contain_text("validation", timeout=30_000)  # validation series too
    expect(page.locator(".events")).to_contain_text("Fine-tuning job started")
    expect(page.locator(".checkpoints-table tbody tr").first).to_be_visible(timeout=30_000)
    expect(page.locator(".checkpoints-table")).to_contain_text(":ckpt-step-")
    expect(page.locator(".job-progress")).to_contain_text(f"of {STEPS}")
    screenshots(page, "04-job-running")


def test_the_finished_job_shows_its_model_card_and_energy(
    page: Any, live: dict[str, Any], job: Any, screenshots
) -> None:
    login(page, live["base"], live["key"])
    page.goto(f"{live['base']}#/jobs/{job.id}")
    expect(status_badge(page)).to_have_text("succeeded", timeout=240_000)
    finished = page.locator(".job-header")
    expect(finished).to_contain_text("ft:tiny-random:acme:support:")
    expect(page.locator(".job-progress")).to_contain_text(f"Step {STEPS} of {STEPS}")
    card = page.locator(".markdown")
    expect(card.locator("h2").first).to_contain_text("Model card")
    expect(card.locator("table").first).to_be_visible()
    assert card.locator("script").count() == 0
    expect(page.locator(".checkpoints-table .tag")).to_have_text("final")
    summary = json.loads((Path(live["data_dir"]) / "jobs" / job.id / "run" / "summary.json").read_text())
    energy = summary.get("energy")
    run = page.locator("#run-title + div")
    if isinstance(energy, dict) and "kwh" in energy:
        expect(run.locator(".energy")).to_contain_text("Wh")
        expect(run.locator(".energy")).to_contain_text("CO₂e")
    else:
        expect(run).to_contain_text("not")
    expect(page.locator('.chart-card[data-family="loss"]')).to_have_attribute("data-points", str(STEPS))
    page.evaluate("window.scrollTo(0, 0)")
    screenshots(page, "06-job-succeeded")
    screenshots(page, "07-job-succeeded-full", full_page=True)


def test_the_playground_compares_base_and_fine_tuned(
    page: Any, live: dict[str, Any], client: openai.OpenAI, job: Any, screenshots
) -> None:
    tuned = client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model
    assert tuned
    streamed: list[str] = []
    page.on(
        "response",
        lambda r: streamed.append(r.headers.get("content-type", "")) if "chat/completions" in r.url else None,
    )
    login(page, live["base"], live["key"])
    page.goto(f"{live['base']}#/playground?model=tiny-random&compare={quote(tuned)}")
    expect(page.locator("#compare")).to_be_checked()
    expect(page.locator("#model-a")).to_have_value("tiny-random")
    expect(page.locator("#model-b")).to_have_value(tuned)
    page.fill("#system", "Be brief.")
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "Where is my order?")
    page.press("#prompt", "Enter")
    answers = page.locator(".msg-assistant[data-done=true]")
    expect(answers).to_have_count(2, timeout=120_000)
    assert [answers.nth(i).get_attribute("data-model") for i in range(2)] == ["tiny-random", tuned]
    for i in range(2):
        expect(answers.nth(i).locator(".msg-meta")).to_contain_text(re.compile(r"\d+ tokens \(prompt \d+\)"))
    assert len(streamed) == 2 and all(t.startswith("text/event-stream") for t in streamed), streamed
    page.fill("#prompt", "Can I return a bike?")
    page.click("#send")
    expect(answers).to_have_count(4, timeout=120_000)
    screenshots(page, "08-playground-compare")


def test_the_pages_fit_a_phone(browser: Any, live: dict[str, Any], job: Any, screenshots) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    page = context.new_page()
    try:
        login(page, live["base"], live["key"])
        for name, route in (("jobs", "#/jobs"), ("job", f"#/jobs/{job.id}"), ("playground", "#/playground")):
            page.goto(f"{live['base']}{route}")
            page.wait_for_selector("h1")
            time.sleep(1)  # the job page draws its charts after its first poll
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{name} is {overflow}px wider than a phone screen"
            screenshots(page, f"09-phone-{name}")
    finally:
        context.close()
