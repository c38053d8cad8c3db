"""End to end: `python app.py` on the tiny preset, driven by gradio_client and by a real browser.

The browser is Debian's chromium (`setup.sh --test` installs it), run by Playwright from PyPI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from app_helpers import converse, free_port
from gradio_client import Client
from playwright.sync_api import Browser, Page, expect, sync_playwright

from demo.examples import example_rows
from demo.handlers import THINKING

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT_S = 240
CAT, QUESTION = example_rows()[0]
COFFEE = example_rows()[1][0]
NOT_AN_IMAGE = {"name": "notes.png", "mimeType": "image/png", "buffer": b"these are notes, not an image"}
SCREENSHOT_ENV = "MINIGPT4_SCREENSHOT"  # where to save the README's screenshot, from the repository root

pytestmark = pytest.mark.slow
expect.set_options(timeout=30_000)  # generous: CI machines are shared


@contextmanager
def _serve_app(cfg_path: str, log_path: Path) -> Iterator[str]:
    """`python app.py --cfg-path CFG_PATH` on a free port, as a user would start it; its URL."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "app.py", "--cfg-path", cfg_path, "--port", str(port)]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"app.py did not start (exit code {server.poll()}):\n{log_path.read_text()}")
            time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory) -> Iterator[str]:
    """The app on the tiny preset."""
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    with _serve_app("eval_configs/minigpt4_tiny_random.yaml", log_path) as url:
        yield url


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).is_file(), "the browser tests need Debian's chromium: run `bash setup.sh --test`"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, app_url: str) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(app_url, wait_until="domcontentloaded")
    yield page
    page.close()


def test_app_py_serves_the_named_api(app_url: str) -> None:
    client = Client(app_url, verbose=False)
    first, second = converse(client, Path(CAT), ["What is this?", "And what colour is it?"])
    assert first and second
    assert "restarted" in client.predict(api_name="/reset")


def test_chat_in_the_browser(page: Page) -> None:
    expect(page.locator("#model-status")).to_contain_text("minigpt4_tiny_random")
    expect(page.locator("#model-status")).to_contain_text("cpu")
    message = page.locator("#message textarea")
    upload = page.get_by_role("button", name="Upload & Start Chat")

    message.fill("What is this?")
    message.press("Enter")  # no image yet: a notice; the question stays, the chat stays clean
    expect(page.get_by_test_id("toast-text").first).to_contain_text("Upload an image first")
    expect(message).to_have_value("What is this?")
    expect(page.get_by_test_id("user")).to_have_count(0)
    expect(page.get_by_test_id("bot")).to_have_count(0)
    page.get_by_test_id("toast-close").first.click()
    expect(page.get_by_test_id("toast-text")).to_have_count(0)

    page.locator("#image input[type=file]").set_input_files(NOT_AN_IMAGE)  # a slip: a text file
    upload.click()
    expect(page.get_by_test_id("toast-text").first).to_contain_text("not an image")
    expect(page.locator("#image img")).to_have_count(0)  # no broken preview left in the box
    expect(page.locator("#chatbot")).not_to_contain_text("Error")
    expect(page.locator("#chatbot img")).to_have_count(0)
    page.get_by_test_id("toast-close").first.click()

    temperature = page.locator("#temperature input[type=range]")
    expect(temperature).to_be_enabled()  # the tiny preset samples
    page.get_by_label("Sample").uncheck()  # greedy: the tiny model's answers are reproducible
    expect(temperature).to_be_disabled()  # … and Temperature would change nothing
    expect(page.locator("#top-p input[type=range]")).to_be_disabled()
    page.get_by_text(QUESTION).click()  # an example: fills the image and the question
    expect(message).to_have_value(QUESTION)
    expect(page.locator("#image img")).to_be_visible()

    message.press("Enter")  # no Upload click: sending uploads the image in the box first
    expect(page.get_by_test_id("user").last).to_contain_text(QUESTION)  # shown before any answer
    expect(message).to_have_value("")
    expect(page.locator("#chat-status")).to_contain_text("1 image in this chat")
    expect(page.locator("#chatbot img")).to_have_count(1)
    expect(page.get_by_test_id("bot").last).to_have_text(re.compile(r"\S"))
    expect(page.get_by_test_id("bot").last).not_to_have_text(THINKING)  # the answer replaced it

    page.locator("#image input[type=file]").set_input_files(COFFEE)
    expect(page.locator("#image img")).to_be_visible()  # the file has reached the server
    upload.click()
    expect(page.locator("#chat-status")).to_contain_text("2 images in this chat")
    expect(page.locator("#chatbot img")).to_have_count(2)
    message.fill("What is in the cup?")
    message.press("Enter")
    expect(page.get_by_test_id("bot")).to_have_count(2)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "app.png", full_page=True)

    page.get_by_role("button", name="Restart").click()
    expect(page.locator("#chat-status")).to_contain_text("restarted")
    expect(page.get_by_test_id("bot")).to_have_count(0)
    expect(page.locator("#chatbot img")).to_have_count(0)


@pytest.mark.skipif(not os.environ.get(SCREENSHOT_ENV), reason=f"set {SCREENSHOT_ENV}=PATH to take it")
def test_screenshot_of_the_default_preset(browser: Browser, tmp_path: Path) -> None:
    """The README's picture: the default preset answering the first example, saved at $MINIGPT4_SCREENSHOT."""
    with _serve_app("minigpt4_lite", tmp_path / "app.log") as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url, wait_until="domcontentloaded")
        expect(page.locator("#model-status")).to_contain_text("minigpt4_lite")
        page.get_by_text(QUESTION).click()
        page.locator("#message textarea").press("Enter")
        answer = page.get_by_test_id("bot").last
        expect(answer).to_contain_text("cat", timeout=120_000)  # the example is scikit-image's cat
        text = ""
        while text != (text := answer.inner_text()):  # streamed: wait until it stops growing
            time.sleep(2)
        path = ROOT / os.environ[SCREENSHOT_ENV]
        path.parent.mkdir(parents=True, exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")  # clicking the example scrolled down to it
        page.screenshot(path=path)
        page.close()
    assert path.stat().st_size > 10_000
