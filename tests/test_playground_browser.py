"""The playground in a real browser (Playwright driving Debian's chromium) against a live server: a chat turn with
the live canvas, an attached image (file picker and drop), stopping a reply, and no console errors."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("PIL")
import httpx  # noqa: E402
from conftest import write_picture  # noqa: E402

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(vision_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dgemma", "serve", "--model", str(vision_model_dir), "--port", str(port),
           "--max-slots", "2", "--max-prompt-tokens", "1024", "--max-body-bytes", str(4 << 20), "--log-level",
           "warning", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up within 90 s"
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the playground; fails the test on any console error, page error or failed response."""
    context = browser.new_context()
    page = context.new_page()
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(server)
    page.wait_for_function("document.getElementById('model-info').textContent.includes('canvas')")
    yield page
    context.close()
    assert problems == []


def _settings(page, max_tokens: int, steps: int) -> None:
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#max_denoising_steps", str(steps))
    page.fill("#seed", "0")


def test_a_chat_turn_shows_the_live_canvas_then_the_answer(page):
    _settings(page, 24, 6)
    page.fill("#user-input", "Hello there")
    heads = []
    page.expose_function("recordHead", lambda text: heads.append(text))
    page.evaluate("""() => new MutationObserver(() => window.recordHead(document.getElementById('canvas-head')
        .textContent)).observe(document.getElementById('canvas-head'), {childList: true, characterData: true,
        subtree: true})""")
    page.click("#send")
    page.wait_for_function("document.getElementById('stats').textContent.includes('finish')", timeout=60_000)
    assert len(set(heads)) >= 2  # the canvas changed pass after pass while the reply was written
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 1
    assert not page.is_disabled("#send") and page.is_disabled("#stop-btn")


def test_an_attached_image_is_sent_as_a_data_url(page, tmp_path):
    picture = write_picture(tmp_path / "cat.png")
    _settings(page, 8, 3)
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    page.set_input_files("#attach-input", str(picture))
    page.wait_for_selector("#attachments .thumb img")
    page.fill("#user-input", "What is this?")
    page.click("#send")
    page.wait_for_function("document.getElementById('stats').textContent.includes('finish')", timeout=60_000)
    content = bodies[0]["messages"][-1]["content"]
    assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1] == {"type": "text", "text": "What is this?"}
    assert page.locator(".msg.user .thumb img").count() == 1  # the thumbnail stays with the sent message
    assert page.locator("#attachments .thumb").count() == 0  # and the next message starts without it
    assert "error" not in (page.text_content("#error") or "").lower()


def test_a_dropped_image_is_attached_and_can_be_removed(page, tmp_path):
    data = list(write_picture(tmp_path / "d.png").read_bytes())
    page.evaluate("""(bytes) => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], "d.png", {type: "image/png"}));
        document.querySelector("section").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true,
                                                                              cancelable: true}));
    }""", data)
    page.wait_for_selector("#attachments .thumb img")
    page.click("#attachments .thumb button")
    assert page.locator("#attachments .thumb").count() == 0


def test_stop_ends_a_reply(page):
    _settings(page, 1024, 256)
    page.fill("#entropy_bound", "0.000001")  # one position accepted per pass: a long reply
    page.fill("#user-input", "Tell me a long story")
    page.click("#send")
    page.wait_for_selector("#canvas span")
    page.click("#stop-btn")
    page.wait_for_function("document.getElementById('stats').textContent.includes('finish: stopped')")
    assert not page.is_disabled("#send")
