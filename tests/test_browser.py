"""The UI in a real headless Chromium, driven by Playwright."""

from __future__ import annotations

import base64
import shutil
import time

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, expect, sync_playwright

from tests.conftest import ARTIFACTS, RunningApp

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Browser:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "Chromium is missing: run 'make test' or apt-get install chromium"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
        )
        yield context
        context.close()


def test_chat_in_the_browser_streams_a_reply(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.goto(running_app.url)
    box = page.locator("#chat-input textarea")
    box.fill("Write one sentence about the sea.")
    box.press("Enter")
    reply = page.locator("#chatbot .bot.message").last
    expect(reply).to_be_visible(timeout=60_000)
    expect(reply).not_to_have_text("", timeout=60_000)
    expect(box).to_have_value("")
    # Wait for the stream to finish: the status panel shows the resident model.
    expect(page.locator("#model-status")).to_contain_text("chat:SmolLM2", timeout=60_000)
    expect(page.locator("#model-notice")).to_contain_text("embedded SmolLM2")
    assert len(reply.inner_text().strip()) > 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-tab.png"), full_page=True)
    page.close()


def test_empty_message_is_not_sent_in_the_browser(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.goto(running_app.url)
    page.locator("#chat-input textarea").fill("   ")
    page.locator("#chat-send").click()
    page.wait_for_timeout(1500)
    assert page.locator("#chatbot .user.message").count() == 0
    page.close()


def test_stop_cancels_a_reply_mid_stream_and_releases_the_model(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.goto(running_app.url)
    page.get_by_text("Parameters").click()
    tokens = page.get_by_label("number input for Max new tokens")
    tokens.fill("1500")  # long enough to still be running when Stop is clicked
    tokens.press("Tab")
    box = page.locator("#chat-input textarea")
    box.fill("Write a very long story about a dragon and a lighthouse keeper.")
    box.press("Enter")
    reply = page.locator("#chatbot .bot.message").last
    expect(reply).not_to_have_text("", timeout=60_000)
    page.locator("#chat-stop").click()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(m["refs"] == 0 for m in httpx.get(f"{running_app.url}/api/status").json()["resident"]):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the model stayed in use after Stop")
    stopped_at = reply.inner_text()
    page.wait_for_timeout(1000)
    assert reply.inner_text() == stopped_at, "the reply kept growing after Stop"
    page.close()


def test_image_tab_answers_about_an_uploaded_image(running_app: RunningApp, browser, tmp_path) -> None:
    picture = tmp_path / "blue.png"
    Image.new("RGB", (48, 32), (30, 60, 220)).save(picture)
    page = browser.new_page()
    page.goto(running_app.url)
    page.get_by_role("tab", name="Image", exact=True).click()
    page.locator("#vision-image input[type=file]").set_input_files(str(picture))
    expect(page.locator("#vision-image img").first).to_be_visible(timeout=30_000)
    page.locator("#vision-question textarea").press("Enter")  # empty: the default question is asked
    answer = page.locator("#vision-chatbot .bot.message").last
    expect(answer).not_to_have_text("", timeout=60_000)
    expect(page.locator("#vision-chatbot .user.message").last).to_contain_text("Describe this image")
    expect(page.locator("#model-status")).to_contain_text("vision:tiny-llava", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "image-tab.png"), full_page=True)
    page.close()


def test_text_to_image_tab_generates_into_the_gallery(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.goto(running_app.url)
    page.get_by_role("tab", name="Text to image").click()
    page.locator("#image-prompt textarea").fill("a lighthouse at dusk")
    page.locator("#image-generate").click()
    expect(page.locator("#image-gallery img").first).to_be_visible(timeout=60_000)
    expect(page.locator("#image-info")).to_contain_text("seed", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "text-to-image-tab.png"), full_page=True)
    page.close()


def test_dropping_a_generated_png_restores_its_settings(running_app: RunningApp, browser, tmp_path) -> None:
    made = httpx.post(
        f"{running_app.url}/v1/images/generations",
        json={"prompt": "a red barn <lora:film-grain:0.6>", "size": "64x64", "steps": 2, "seed": 42},
        timeout=120,
    ).json()
    png = tmp_path / "made-here.png"
    png.write_bytes(base64.b64decode(made["data"][0]["b64_json"]))
    page = browser.new_page()
    page.goto(running_app.url)
    page.get_by_role("tab", name="Text to image").click()
    page.locator("#image-restore input[type=file]").set_input_files(str(png))
    expect(page.locator("#image-prompt textarea")).to_have_value("a red barn <lora:film-grain:0.6>", timeout=30_000)
    expect(page.get_by_label("Seed (-1: random)")).to_have_value("42")
    page.close()
