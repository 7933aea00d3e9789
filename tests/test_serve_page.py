"""The question-answering page at / in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from serve_helpers import ThreadServer, tiny_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("expected Debian's chromium in CI (.ci/run installs it), found none")
        pytest.skip("no chromium binary (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    with ThreadServer(tiny_app()) as s:
        yield s


def _ask(page, question: str) -> dict:
    page.fill("#question", question)
    page.click("#ask")
    page.wait_for_function("document.getElementById('status').textContent === 'done' || "
                           "document.getElementById('status').textContent === 'failed'", timeout=30_000)
    return {name: page.text_content(f"#{name}") for name in
            ("status", "error", "answer", "ttft", "server-ttft", "cached", "prefilled", "encoded")}


def test_page_streams_answer_sources_and_cache_counts(browser, server, tmp_path):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('server').textContent.includes('tiny-random')")
    page.fill("#documents", "# Paris\nParis is the capital of France.\n\n# Rome\nRome is the capital of Italy.")
    page.fill("#max-tokens", "8")
    first = _ask(page, "What is the capital of France?")
    assert first["status"] == "done" and not first["error"], first
    assert first["answer"] and first["ttft"].endswith(" ms") and first["server-ttft"].endswith(" ms")
    sources = page.locator("#sources li")
    assert sources.count() == 2 and "Paris" in sources.nth(0).text_content()
    assert "[encoded now]" in sources.nth(0).text_content()
    assert int(first["encoded"]) > 0

    second = _ask(page, "What is the capital of France?")
    assert int(second["cached"]) >= int(first["encoded"]) > 0 and int(second["encoded"]) == 0
    assert "[cached block]" in page.locator("#sources li").nth(0).text_content()
    assert second["answer"] == first["answer"]  # greedy, same blocks

    page.check("#mode-full")
    full = _ask(page, "What is the capital of France?")
    assert int(full["cached"]) == 0 and int(full["prefilled"]) > int(second["prefilled"])
    page.screenshot(path=os.environ.get("BLOCKRAG_PAGE_SCREENSHOT", str(tmp_path / "page.png")))
    assert not errors, errors


def test_page_shows_server_errors(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('server').textContent.includes('tiny-random')")
    page.fill("#documents", "Some text.")
    page.fill("#max-tokens", "-3")
    result = _ask(page, "Why?")
    assert result["status"] == "failed" and "400" in result["error"] and "max_tokens" in result["error"]
