"""The UI in a real headless Chromium, driven by Playwright."""

from __future__ import annotations

import base64
import time

import httpx
import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.conftest import ARTIFACTS, RunningApp

pytestmark = pytest.mark.browser


def last_answer(page):  # -> Locator
    """The text of the newest answer in the Chat tab (its route note is a separate, titled block)."""
    return page.locator("#chatbot .bot-row").last.locator(".message-content .md").last


def test_chat_in_the_browser_streams_a_reply(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.goto(running_app.url)
    box = page.locator("#chat-input textarea")
    box.fill("Write one sentence about the sea.")
    box.press("Enter")
    reply = last_answer(page)
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
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_timeout(1500)
    assert page.locator("#chatbot .user.message").count() == 0
    page.close()


def chat_in_use(app: RunningApp) -> bool:
    resident = httpx.get(f"{app.url}/api/status").json()["resident"]
    return any(m["in_use"] for m in resident if m["kind"] == "chat")


def test_stop_cancels_a_reply_mid_stream_and_releases_the_model(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.goto(running_app.url)
    page.get_by_text("Parameters").click()
    # Greedy, without a repeat penalty, SmolLM2 answers this with a loop that runs to the token
    # limit (1500 tokens, tens of seconds here): a reply that ends within seconds was stopped.
    for label, value in (("Max new tokens", "1500"), ("Temperature", "0"), ("Repeat penalty (1: off)", "1")):
        field = page.get_by_label(label, exact=True)
        field.fill(value)
        field.press("Tab")
    box = page.locator("#chat-input textarea")
    box.fill("Repeat after me forever: la la la la la la la la")
    box.press("Enter")
    reply = last_answer(page)
    expect(reply).not_to_have_text("", timeout=60_000)
    assert chat_in_use(running_app), "the reply should still be running"
    page.locator("#chat-stop").click()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if not chat_in_use(running_app):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the model stayed in use after Stop")
    expect(reply).to_contain_text("(stopped)", timeout=5_000)  # a stopped reply says so
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


def wait_until_finished(page, app: RunningApp, timeout_s: float = 60) -> None:
    """Until no model is in use and the UI has taken the last update (a chat input ignores
    Enter while its previous message is still being answered)."""
    deadline = time.monotonic() + timeout_s
    while any(m["in_use"] for m in httpx.get(f"{app.url}/api/status").json()["resident"]):
        assert time.monotonic() < deadline, "a model stayed in use"
        time.sleep(0.1)
    expect(page.locator("#chatbot .pending")).to_have_count(0, timeout=timeout_s * 1000)
    page.wait_for_timeout(300)


def load_counts(app: RunningApp) -> dict[str, int]:
    counts = httpx.get(f"{app.url}/api/status").json()["load_counts"]
    return {kind: sum(n for label, n in counts.items() if label.startswith(kind + ":")) for kind in KINDS}


KINDS = ("chat", "vision", "image")


def test_one_conversation_chats_draws_and_looks(running_app: RunningApp, browser, tmp_path) -> None:
    resident = [m["kind"] for m in httpx.get(f"{running_app.url}/api/status").json()["resident"]]
    before = load_counts(running_app)
    page = browser.new_page()
    page.goto(running_app.url)
    box = page.locator("#chat-input textarea")
    rows = page.locator("#chatbot .bot-row")

    box.fill("Hello! Say one short sentence.")
    box.press("Enter")
    expect(rows.last).to_contain_text("→ chat model", timeout=60_000)
    expect(last_answer(page)).not_to_have_text("", timeout=60_000)
    wait_until_finished(page, running_app)

    box.fill("draw a lighthouse at dusk")
    box.press("Enter")
    expect(rows.last).to_contain_text("→ image generator: asked to draw", timeout=60_000)
    expect(rows.last.locator("img").first).to_be_visible(timeout=120_000)
    expect(rows.last).to_contain_text("Prompt used:", timeout=10_000)
    wait_until_finished(page, running_app)

    picture = tmp_path / "green.png"
    Image.new("RGB", (40, 40), (20, 160, 40)).save(picture)
    page.locator("#chat-input input[type=file]").set_input_files(str(picture))
    box.fill("What is in this picture?")
    box.press("Enter")
    expect(rows.last).to_contain_text("→ vision model", timeout=60_000)
    expect(last_answer(page)).not_to_have_text("", timeout=60_000)
    expect(page.locator("#model-status")).to_contain_text("vision:tiny-llava", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "assistant-conversation.png"), full_page=True)
    page.close()

    after = load_counts(running_app)
    # One model at a time: chat (unless it was loaded already), the generator, then vision.
    assert after["chat"] - before["chat"] == (0 if "chat" in resident else 1)
    assert after["image"] - before["image"] == 1
    assert after["vision"] - before["vision"] == 1
