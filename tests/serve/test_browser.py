"""The web chat page in a real browser: headless Chromium (Debian `chromium`) driven by Playwright opens `/` of a
live `memlm serve`, sends a message, sees the reply arrive in several streamed pieces, toggles learning, switches
sessions (and back, with the transcript restored), and never logs a console error (a CSP violation would).

Skips cleanly without the `playwright` Python package or a chromium binary. CI needs:
    apt-get install -y chromium   and   pip install playwright   (no `playwright install`: the system browser is used)
Screenshot: tmp folder always; also to $MEMLM_WEB_SCREENSHOT when set (docs/img/web-chat.png is made that way, with
$MEMLM_WEB_MODEL pointing at a trained model folder for readable replies).

Notation: none.
"""
from __future__ import annotations

import os
import re
import shutil

import pytest

pytest.importorskip("fastapi")
pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for cand in (os.environ.get("MEMLM_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def test_web_chat_in_headless_chromium(tmp_path, live_server):
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("the 'playwright' Python package is not installed (pip install playwright)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium binary (apt-get install -y chromium)")
    trained = os.environ.get("MEMLM_WEB_MODEL")  # a trained model reads better sampled than greedy
    srv = live_server(tmp_path, *(("--temperature", "0.7", "--seed", "1") if trained else ()), model=trained)
    errors: list[str] = []
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=exe, headless=True,
                                                    args=CHROMIUM_FLAGS, viewport={"width": 1200, "height": 760})
        try:
            page = ctx.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_selector("body[data-session]", timeout=30_000)
            first = page.get_attribute("body", "data-session")
            assert first and first.startswith("web-")
            page.fill("#max-tokens", "24")
            page.fill("#input", "Hello! My name is Zed.")
            page.click("#send")
            reply = page.wait_for_selector('.msg.assistant[data-done="1"]', timeout=60_000)
            assert int(reply.get_attribute("data-chunks")) >= 2  # the text arrived in pieces (SSE), not at once
            assert reply.inner_text().strip()
            # (waits use expect(), which polls from outside: the page's CSP forbids eval, so wait_for_function
            # with a JS string would be refused — which also shows the CSP is enforced)
            expect(page.locator("#stats")).to_contain_text("turns")
            expect(page.locator("#stats")).to_contain_text(re.compile("persistent|session"))  # polled, like all waits
            expect(page.locator("#layers tbody tr")).to_have_count(2)  # one row per layer of the debug model (polled:
            # the stats text and the layer table are filled by the same refresh but may render a moment apart)
            # learning toggle goes to the server and back into the panel
            page.click("#learning")
            expect(page.locator("#stats")).to_contain_text("off")
            page.click("#learning")
            expect(page.locator("#stats")).not_to_contain_text("off")
            # a second message, then the screenshot (both bubbles and the stats panel visible)
            page.fill("#input", "What is my name?")
            page.click("#send")
            expect(page.locator('.msg.assistant[data-done="1"]')).to_have_count(2, timeout=60_000)
            expect(page.locator("#stats")).to_have_attribute("data-turns", "2")
            shot = tmp_path / "web-chat.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("MEMLM_WEB_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["MEMLM_WEB_SCREENSHOT"])
            # switch to a new session: an empty conversation
            page.fill("#new-session", "second")
            page.click("#new-session-btn")
            expect(page.locator("body")).to_have_attribute("data-session", "second")
            expect(page.locator(".msg")).to_have_count(0)
            # and back: the first session's transcript comes back from the server
            page.select_option("#session-select", first)
            expect(page.locator("body")).to_have_attribute("data-session", first)
            expect(page.locator(".msg")).to_have_count(4)
            expect(page.locator(".msg.user").first).to_have_text("Hello! My name is Zed.")
        finally:
            ctx.close()
    assert errors == []
