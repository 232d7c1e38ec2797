"""Fixtures of the browser tests: a live `tunery serve` on 127.0.0.1 with a temp data directory, training
tiny-random with the real CLI, and the system's headless Chromium driven by Playwright.

Without Playwright or Chromium the tests skip and say which is missing; `make test` installs both
(Playwright through the dev extra, Chromium with apt-get when run as root). Playwright never downloads a
browser here: it drives the installed one (`TUNERY_CHROMIUM`, else `chromium` on the PATH).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.test_openai_client import new_key, start_server, stop_server

SCREENSHOTS = Path(os.environ.get("TUNERY_SCREENSHOTS", "/tmp/tunery-screenshots"))
# the console messages a page may log: the browser's own line for the 401 the wrong-key test provokes
EXPECTED_CONSOLE = ("status of 401",)


def chromium_path() -> str | None:
    configured = os.environ.get("TUNERY_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# package scope: Playwright's sync API keeps an event loop running on the main thread while it is open,
# and tests elsewhere call asyncio.run, which refuses to start under a running loop
@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install -e '.[dev]' (`make test` does)")
    path = chromium_path()
    if path is None:
        pytest.skip(
            "no Chromium found: apt-get install chromium (`make test` does, as root), or set TUNERY_CHROMIUM"
        )
    with sync_playwright() as playwright:
        # no sandbox: Chromium refuses to start as root with it, and these pages are our own
        launched = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A running `tunery serve`: its base URL (the web app), data directory and a key of project acme."""
    data_dir = tmp_path_factory.mktemp("web") / "service"
    key = new_key(data_dir, "acme")
    proc, api_url = start_server(data_dir)
    try:
        yield {"base": api_url.removesuffix("v1"), "api": api_url, "data_dir": data_dir, "key": key}
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any, str], Path]:
    """shot(page, name): a PNG in the test's temp directory, copied to SCREENSHOTS to look at."""
    directory = tmp_path_factory.mktemp("screenshots")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def shot(page: Any, name: str, full_page: bool = False) -> Path:
        path = directory / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        shutil.copyfile(path, SCREENSHOTS / path.name)
        return path

    return shot


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page (own storage) that fails the test on a JavaScript error or an unexpected console error
    (a content-security-policy refusal shows up there too)."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    new_page = context.new_page()
    problems: list[str] = []
    new_page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    new_page.on(
        "console",
        lambda message: (
            problems.append(f"console {message.type}: {message.text}")
            if message.type == "error" and not any(s in message.text for s in EXPECTED_CONSOLE)
            else None
        ),
    )
    yield new_page
    context.close()
    assert not problems, problems


def login(page: Any, base: str, key: str) -> None:
    page.goto(base)
    page.fill("#api-key", key)
    page.click("button[type=submit]")
    page.wait_for_selector("#topbar:not([hidden])")
