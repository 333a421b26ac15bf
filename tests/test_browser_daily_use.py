"""The UI for daily use, in a real headless Chromium: errors in place, honest controls, the
Models tab, saved conversations (across a kill -9 and a restart), regenerate, edit, continue,
and a phone-sized screen."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.conftest import (
    ARTIFACTS,
    CHROMIUM_FLAGS,
    TINY_SECTIONS,
    RunningApp,
    chromium_context,
    free_port,
    start_app,
    stop_app,
    write_config,
)

pytestmark = pytest.mark.browser

PHONE = {"width": 390, "height": 844}


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def bot_texts(page: Page) -> list[str]:
    """The text of each model-written answer in the Chat tab (route notes, tips and errors left out)."""
    texts = page.locator("#chatbot .bot-row .message-content").all_inner_texts()
    return [t.strip() for t in texts if t.strip() and not t.strip().startswith(("Tip:", "⚠️"))]


def wait_idle(page: Page, app: RunningApp, timeout_s: float = 60, key: str | None = None) -> None:
    """Until no model is in use and the conversation has stopped changing (the page took the last update)."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    shown = None
    while True:
        assert time.monotonic() < deadline, "the reply did not settle"
        busy = any(m["in_use"] for m in httpx.get(f"{app.url}/api/status", headers=headers).json()["resident"])
        now = page.locator("#chatbot").inner_text()
        if not busy and now == shown:
            return
        shown = now
        page.wait_for_timeout(700)


def set_parameters(page: Page, **values: str) -> None:
    if not page.get_by_label("Max new tokens", exact=True).is_visible():
        page.get_by_text("Parameters").click()
    labels = {"max_tokens": "Max new tokens", "temperature": "Temperature", "repeat": "Repeat penalty (1: off)"}
    for key, value in values.items():
        field = page.get_by_label(labels[key], exact=True)
        field.fill(value)
        field.press("Tab")


def send(page: Page, text: str, accepted: bool = True) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")
    if accepted:  # the box empties when the message is taken
        expect(box).to_have_value("", timeout=30_000)


def no_error_cover(page: Page) -> None:
    """Gradio's error toast and its red cover over components: neither may appear."""
    assert page.locator(".toast-body").count() == 0, page.locator(".toast-body").all_inner_texts()
    assert page.locator(".wrap.error, .error-cover").count() == 0


# -- errors in place -------------------------------------------------------------------------------


def test_an_error_shows_in_the_conversation_and_the_chat_stays_usable(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.goto(running_app.url)
    too_long = "x" * 33_000  # chat.max_message_chars is 32,000
    send(page, too_long, accepted=False)
    error = page.locator("#chatbot .bot.message").last
    expect(error).to_contain_text("The message is 33,000 characters; the limit is 32,000", timeout=30_000)
    box = page.locator("#chat-input textarea")
    expect(box).to_have_value(too_long)  # nothing typed is lost
    no_error_cover(page)
    shot(page, "error-in-place.png")
    # The same box takes the next message at once; the old error goes when the user tries again.
    send(page, "Say hi.")
    expect(page.locator("#chatbot")).not_to_contain_text("33,000 characters", timeout=30_000)
    wait_idle(page, running_app)
    assert bot_texts(page), "the next message was answered"
    page.close()


def test_out_of_range_values_are_refused_where_typed_never_changed(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.goto(running_app.url)
    page.get_by_role("tab", name="Text to image").click()
    width = page.get_by_label("Width", exact=True)
    width.fill("1000")  # the tiny test config allows 64–256
    width.press("Tab")
    problems = page.locator("#image-field-problems")
    expect(problems).to_contain_text("Width 1000 is not used: allowed is 64–256, a multiple of 8")
    expect(width).to_have_value("1000")  # not pulled into range behind the user's back
    page.locator("#image-prompt textarea").fill("a red barn")
    page.locator("#image-generate").click()
    expect(page.locator("#image-info")).to_contain_text("Width 1000 is not used", timeout=30_000)
    assert page.locator("#image-gallery img").count() == 0, "nothing is generated with a refused value"
    no_error_cover(page)
    shot(page, "refused-value.png")
    width.fill("128")
    width.press("Tab")
    expect(problems).to_be_hidden()
    page.get_by_role("tab", name="Chat").click()
    set_parameters(page, temperature="5")
    expect(page.locator("#chat-field-problems")).to_contain_text("Temperature 5 is not used: allowed is 0–2")
    expect(page.get_by_label("Temperature", exact=True)).to_have_value("5")
    page.close()


def test_a_png_without_settings_is_answered_beside_the_drop_zone(running_app: RunningApp, browser, tmp_path) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(plain)
    page = browser.new_page()
    page.goto(running_app.url)
    page.get_by_role("tab", name="Text to image").click()
    page.locator("#image-restore input[type=file]").set_input_files(str(plain))
    note = page.locator("#image-restore-note")
    expect(note).to_contain_text("This image carries no generation parameters", timeout=30_000)
    no_error_cover(page)
    prompt = page.locator("#image-prompt textarea")
    prompt.fill("still usable")
    expect(prompt).to_have_value("still usable")
    page.close()


def test_a_stopped_reply_is_marked_and_can_be_continued(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.goto(running_app.url)
    set_parameters(page, max_tokens="6", temperature="0", repeat="1")
    send(page, "Count from 1 to 30, separated by commas.")
    wait_idle(page, running_app)
    first = bot_texts(page)[-1]
    assert first.endswith("…"), f"a reply cut at its token limit is marked: {first!r}"
    set_parameters(page, max_tokens="12")
    page.locator("#chat-continue").click()
    wait_idle(page, running_app)
    continued = bot_texts(page)[-1]
    assert len(bot_texts(page)) == 1, "Continue extends the reply; it does not add another"
    assert continued.startswith(first.removesuffix("…").rstrip()) and len(continued) > len(first)
    page.close()


# -- the Models tab ----------------------------------------------------------------------------------


def test_the_models_tab_shows_present_and_missing_models_and_unloads(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.goto(running_app.url)
    send(page, "Say hi.")  # the chat model gets loaded
    wait_idle(page, running_app)
    page.get_by_role("tab", name="Models").click()
    table = page.locator("#models-table")
    # The configured Mistral GGUF is missing here; the embedded model answers; tiny models are present.
    expect(table).to_contain_text("mistral-7b-instruct-v0.2.Q4_K_M", timeout=30_000)
    rows = {row.inner_text().split("\t")[1].strip(): row.inner_text() for row in table.locator("tbody tr").all()}
    assert "missing" in rows["mistral-7b-instruct-v0.2.Q4_K_M"]
    assert "loaded" in rows["SmolLM2-135M-Instruct"] and "★" in rows["SmolLM2-135M-Instruct"]
    assert "present" in rows["tiny-llava"] and "present" in rows["tiny-sd15"]
    assert "present" in rows["film-grain"]
    missing = page.locator("#models-missing")
    expect(missing).to_contain_text("huggingface-cli download TheBloke/Mistral-7B-Instruct-v0.2-GGUF")
    expect(missing).to_contain_text("mistral-7b-instruct-v0.2.Q4_K_M.gguf")
    shot(page, "models-tab.png")
    expect(page.locator("#models-loaded input")).to_have_value("chat:SmolLM2-135M-Instruct.Q4_1.gguf")
    page.locator("#models-unload").click()
    expect(page.locator("#models-message")).to_contain_text("Unloaded chat:SmolLM2", timeout=30_000)
    resident = httpx.get(f"{running_app.url}/api/status").json()["resident"]
    assert not [m for m in resident if m["kind"] == "chat"], "the chat model left memory"
    page.close()


# -- regenerate and edit -----------------------------------------------------------------------------


def test_regenerate_and_edit_a_message(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.goto(running_app.url)
    set_parameters(page, max_tokens="3", temperature="0")
    send(page, "Tell me about the sea.")
    wait_idle(page, running_app)
    short = bot_texts(page)[-1]
    # Regenerate with a longer limit: the same message is answered again, and the new answer replaces it.
    set_parameters(page, max_tokens="24")
    page.locator("#chatbot").get_by_role("button", name="Retry").last.click()
    wait_idle(page, running_app)
    longer = bot_texts(page)
    assert len(longer) == 1 and len(longer[0]) > len(short), (short, longer)
    assert page.locator("#chatbot .user.message").count() == 1
    # Edit the question: the conversation goes on from the edited message.
    page.locator("#chatbot").get_by_role("button", name="Edit").first.click()
    editor = page.locator("#chatbot textarea.edit-textarea")
    editor.fill("What is the capital of France?")
    page.locator("#chatbot").get_by_role("button", name="Submit").click()
    wait_idle(page, running_app)
    users = page.locator("#chatbot .user.message")
    expect(users).to_have_count(1)
    expect(users.first).to_contain_text("What is the capital of France?")
    answers = bot_texts(page)
    assert len(answers) == 1 and answers[0] != longer[0]
    shot(page, "regenerate-and-edit.png")
    page.close()


# -- a phone-sized screen ----------------------------------------------------------------------------


def test_a_phone_sized_screen_keeps_stop_in_reach_while_streaming(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.set_viewport_size(PHONE)
    page.goto(running_app.url)
    set_parameters(page, max_tokens="1500", temperature="0", repeat="1")
    send(page, "Repeat after me forever: la la la la la la la la")
    expect(page.locator("#chatbot .bot.message").last).not_to_have_text("", timeout=60_000)
    stop = page.locator("#chat-stop")
    box = stop.bounding_box()
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= PHONE["height"], box
    shot(page, "phone-streaming.png")
    stop.click()
    expect(page.locator("#chatbot")).to_contain_text("(stopped)", timeout=10_000)
    wait_idle(page, running_app)
    # The status table scrolls sideways instead of wrapping a model's name letter by letter.
    name_cell = page.locator("#model-status td").first
    cell = name_cell.bounding_box()
    assert cell is not None and cell["height"] < 60, cell
    page.close()


def test_a_phone_sized_screen_shows_the_gallery_next_to_generate(running_app: RunningApp, browser) -> None:
    page = browser.new_page()
    page.set_viewport_size(PHONE)
    page.goto(running_app.url)
    page.get_by_role("tab", name="Text to image").click()
    generate = page.locator("#image-generate").bounding_box()
    gallery = page.locator("#image-gallery").bounding_box()
    settings = page.get_by_label("Width", exact=True).bounding_box()
    assert generate and gallery and settings
    assert gallery["y"] < settings["y"], "the gallery comes before the settings"
    assert gallery["y"] - (generate["y"] + generate["height"]) < 400, (generate, gallery)
    shot(page, "phone-text-to-image.png")
    page.close()


# -- saved conversations -----------------------------------------------------------------------------

KEY = "a-key-for-the-browser-tests-1234"


def log_in(page: Page, url: str) -> None:
    page.goto(url)
    page.locator("input[type=password]").fill(KEY)
    page.locator("input[type=text]").first.fill("me")
    page.get_by_role("button", name="Login").click()
    expect(page.locator("#chat-input")).to_be_visible(timeout=30_000)


def test_a_conversation_survives_kill_9_and_a_restart_per_browser(
    tmp_path: Path, tiny_models: Path, playwright
) -> None:
    folder = tmp_path / "app"
    folder.mkdir()
    config = write_config(
        folder, tiny_models, server={"api_key": KEY}, chat={"context_size": 2048, "defaults": {"max_tokens": 16}},
        **TINY_SECTIONS,
    )  # fmt: skip
    port = free_port()
    app = start_app(config, folder / "first.log", port=port)
    try:
        mine = chromium_context(playwright, tmp_path / "mine")
        page = mine.new_page()
        log_in(page, app.url)
        send(page, "Remember the word lighthouse.")
        wait_idle(page, app, key=KEY)
        picture = tmp_path / "green.png"
        Image.new("RGB", (40, 40), (20, 160, 40)).save(picture)
        page.locator("#chat-input input[type=file]").set_input_files(str(picture))
        expect(page.locator("#chat-input img").first).to_be_visible(timeout=30_000)  # uploaded
        send(page, "What is in this picture?")
        expect(page.locator("#chatbot .bot-row").last).to_contain_text("→ vision model", timeout=60_000)
        wait_idle(page, app, key=KEY)
        expect(page.locator("#conversation-list")).to_contain_text("Remember the word lighthouse.")
        before = page.locator("#chatbot .message").count()
        app.process.kill()  # kill -9: no chance to flush anything
        app.process.wait()
        app = start_app(config, folder / "second.log", port=port)

        log_in(page, app.url)  # sign-ins do not outlive the server; the browser's own id does
        expect(page.locator("#conversation-list")).to_contain_text("Remember the word lighthouse.", timeout=30_000)
        page.locator("#conversation-list label").first.click()
        expect(page.locator("#chatbot .user.message").first).to_contain_text("Remember the word lighthouse.")
        expect(page.locator("#chatbot .message")).to_have_count(before, timeout=30_000)
        expect(page.locator("#chatbot img").first).to_be_visible(timeout=30_000)  # the attached picture
        shot(page, "conversation-reopened.png")
        # Search, rename, export and delete.
        search = page.locator("#conversation-search textarea, #conversation-search input").first
        search.fill("no such words")
        expect(page.locator("#conversation-list label")).to_have_count(0, timeout=10_000)
        search.fill("LIGHTHOUSE")
        expect(page.locator("#conversation-list label")).to_have_count(1, timeout=10_000)
        page.get_by_text("This conversation").click()
        title = page.locator("#conversation-title textarea, #conversation-title input").first
        title.fill("Words to remember")
        page.locator("#conversation-rename").click()
        expect(page.locator("#conversation-list")).to_contain_text("Words to remember", timeout=10_000)
        search.fill("")
        page.locator("#conversation-export").click()
        markdown_link = page.locator("#conversations a[href$='.md']").first
        expect(markdown_link).to_be_attached(timeout=10_000)
        exported = page.request.get(markdown_link.get_attribute("href") or "").text()
        assert exported.startswith("# Words to remember") and "Remember the word lighthouse." in exported

        # Another browser with the same key sees none of it.
        other = chromium_context(playwright, tmp_path / "other")
        theirs = other.new_page()
        log_in(theirs, app.url)
        expect(theirs.locator("#conversation-list")).to_contain_text("Conversations (0)", timeout=10_000)
        other.close()

        page.locator("#conversation-delete").click()
        page.locator("#conversation-confirm-delete").click()
        expect(page.locator("#conversation-list")).not_to_contain_text("Words to remember", timeout=10_000)
        expect(page.locator("#chatbot .message")).to_have_count(0)
        mine.close()
    finally:
        stop_app(app)


# -- voice ---------------------------------------------------------------------------------------------


def voice_loads(app: RunningApp) -> int:
    counts = httpx.get(f"{app.url}/api/status").json()["load_counts"]
    return sum(n for label, n in counts.items() if label.startswith("speech:"))


def fake_microphone(playwright, app: RunningApp, recording: Path) -> Page:
    """A page whose microphone plays ``recording`` over and over (Chromium's fake capture device)."""
    import shutil

    browser = playwright.chromium.launch(
        executable_path=shutil.which("chromium") or shutil.which("chromium-browser"),
        headless=True,
        args=[
            *CHROMIUM_FLAGS,
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={recording}",
        ],
    )
    page = browser.new_context(permissions=["microphone"]).new_page()
    page.goto(app.url)
    return page


def espeak(tmp_path: Path, sentence: str, silence_after_s: float = 0, silence_before_s: float = 0) -> Path:
    import subprocess

    spoken, padded = tmp_path / "spoken.wav", tmp_path / "padded.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "-w", str(spoken), sentence], check=True)
    pad = ["pad", str(silence_before_s), str(silence_after_s)]
    subprocess.run(["sox", str(spoken), str(padded), *pad], check=True)
    return padded


def speak_into_microphone(playwright, tmp_path: Path, app: RunningApp, sentence: str) -> Page:
    """A page whose microphone says ``sentence``, recorded once through the Chat tab's microphone."""
    page = fake_microphone(playwright, app, espeak(tmp_path, sentence))
    microphone = page.locator("#chat-microphone")
    microphone.get_by_role("button", name="Record", exact=True).click()
    page.wait_for_timeout(2500)  # Chromium plays the file in a loop: one pass and a bit
    microphone.get_by_role("button", name="Stop", exact=True).click()
    return page


def test_a_spoken_message_is_transcribed_answered_and_the_answer_spoken(
    running_app: RunningApp, playwright, tmp_path
) -> None:
    page = speak_into_microphone(playwright, tmp_path, running_app, "What is the capital of France?")
    page.locator("#chat-speak-replies input").check()
    user = page.locator("#chatbot .user.message").first
    expect(user).to_contain_text("capital of France", timeout=60_000)  # the transcript, shown as the message
    expect(page.locator("#chatbot .bot-row").last).to_contain_text("→ chat model", timeout=60_000)
    wait_idle(page, running_app)
    assert bot_texts(page), "the spoken message was answered"
    # A second, typed message is answered and spoken: the voice speaks, and the reply's player fills.
    spoken_before = voice_loads(running_app)
    send(page, "Say one short sentence.")
    wait_idle(page, running_app)
    expect(page.locator("#chat-reply-audio audio")).to_have_count(1, timeout=60_000)
    # One model at a time: the chat model answered, so speaking it took the voice back in.
    assert voice_loads(running_app) > spoken_before, "the reply was not spoken"
    shot(page, "voice-turn.png")
    page.context.browser.close()


def test_a_spoken_drawing_request_reaches_the_image_generator(running_app: RunningApp, playwright, tmp_path) -> None:
    page = speak_into_microphone(playwright, tmp_path, running_app, "Draw a red apple.")
    expect(page.locator("#chatbot .user.message").first).to_contain_text("red apple", timeout=60_000)
    expect(page.locator("#chatbot .bot-row").last).to_contain_text("→ image generator", timeout=60_000)
    expect(page.locator("#chatbot .bot-row").last.locator("img").first).to_be_visible(timeout=120_000)
    page.context.browser.close()


def test_hands_free_turns_end_on_a_pause_and_talking_over_an_answer_stops_it(
    running_app: RunningApp, playwright, tmp_path
) -> None:
    # The fake microphone is silent for 3 s (the browser drops what it hears before the server has
    # taken the stream, which is what the status line is for), says the sentence, then is silent
    # for 8 s and says it again: the pause ends the first turn, and the repetition talks over the
    # (endless) answer to it.
    recording = espeak(tmp_path, "Repeat after me forever: la la la la.", silence_after_s=8, silence_before_s=3)
    page = fake_microphone(playwright, running_app, recording)
    set_parameters(page, max_tokens="1500", temperature="0", repeat="1")
    page.get_by_text("Hands-free voice mode").click()
    status = page.locator("#chat-hands-free-status")
    expect(status).to_contain_text("start speaking when this says Listening")
    page.locator("#chat-hands-free").get_by_role("button", name="Record", exact=True).click()
    expect(status).to_contain_text("Listening: speak now", timeout=30_000)
    expect(page.locator("#chatbot .user.message").first).to_contain_text("Repeat after me", timeout=60_000)
    first_answer = page.locator("#chatbot .bot-row").first
    expect(first_answer).to_contain_text("→ chat model", timeout=60_000)
    expect(first_answer).to_contain_text("(stopped)", timeout=60_000)  # the second "Repeat after me" stopped it
    expect(page.locator("#chatbot .user.message")).to_have_count(2, timeout=60_000)  # and became the next turn
    stopped = first_answer.inner_text()
    assert len(stopped.split()) < 1000, "the answer was cut long before its 1500 tokens"
    shot(page, "hands-free.png")
    page.locator("#chat-hands-free").get_by_role("button", name="Stop", exact=True).click()
    expect(status).to_contain_text("start speaking when this says Listening", timeout=30_000)
    page.context.browser.close()


# -- img2img and the hires fix in the Text-to-image tab ----------------------------------------------


def newest_png(page: Page) -> str:
    """The saved PNG the info beside the gallery names ("seed 123: /…/file.png")."""
    import re

    found = re.search(r"seed \d+: (\S+\.png)", page.locator("#image-info").inner_text())
    assert found, page.locator("#image-info").inner_text()
    return found.group(1)


def saved_parameters(page: Page) -> str:
    return Image.open(newest_png(page)).text["parameters"]


def test_a_picture_goes_back_into_img2img_with_the_hires_fix_and_comes_back_from_its_png(
    running_app: RunningApp, browser
) -> None:
    page = browser.new_page()
    page.goto(running_app.url)
    page.get_by_role("tab", name="Text to image").click()
    page.locator("#image-prompt textarea").fill("a red barn")
    steps = page.get_by_label("Steps", exact=True)
    steps.fill("2")
    steps.press("Tab")
    page.locator("#image-generate").click()
    expect(page.locator("#image-info")).to_contain_text("seed", timeout=60_000)
    page.locator("#image-gallery img").first.click()
    page.locator("#image-send-to-start").click()
    expect(page.locator("#image-info")).to_contain_text("Start from a picture", timeout=10_000)
    page.get_by_text("Start from a picture: img2img").click()
    expect(page.locator("#image-start-editor canvas, #image-start-editor img").first).to_be_visible(timeout=10_000)
    page.locator("#image-hires input").check()
    first = page.locator("#image-info").inner_text()
    page.locator("#image-generate").click()
    expect(page.locator("#image-info")).not_to_have_text(first, timeout=90_000)
    expect(page.locator("#image-info")).to_contain_text("seed", timeout=10_000)
    parameters = saved_parameters(page)
    assert "Denoising strength" in parameters and "Hires upscale: 2" in parameters, parameters
    shot(page, "img2img-hires.png")
    # The PNG brings the hires settings back.
    path = newest_png(page)
    fresh = browser.new_page()
    fresh.goto(running_app.url)
    fresh.get_by_role("tab", name="Text to image").click()
    fresh.locator("#image-restore input[type=file]").set_input_files(path)
    expect(fresh.locator("#image-restore-note")).to_contain_text("Restored", timeout=30_000)
    expect(fresh.locator("#image-hires input")).to_be_checked()
    expect(fresh.get_by_label("Hires scale", exact=True)).to_have_value("2")
    fresh.close()
    page.close()


def test_painting_over_a_picture_in_the_editor_repaints_only_that_area(running_app: RunningApp, browser) -> None:
    import numpy as np

    page = browser.new_page()
    page.goto(running_app.url)
    page.get_by_role("tab", name="Text to image").click()
    page.locator("#image-prompt textarea").fill("a blue lake")
    steps = page.get_by_label("Steps", exact=True)
    steps.fill("3")
    steps.press("Tab")
    page.locator("#image-generate").click()
    expect(page.locator("#image-info")).to_contain_text("seed", timeout=60_000)
    start = np.asarray(Image.open(newest_png(page)).convert("RGB"), dtype=np.int16)
    page.locator("#image-gallery img").first.click()
    page.locator("#image-send-to-start").click()
    page.get_by_text("Start from a picture: img2img").click()
    canvas = page.locator("#image-start-editor canvas").first
    expect(canvas).to_be_visible(timeout=10_000)
    page.wait_for_timeout(1000)  # the editor fits the picture into its canvas
    # The brush is the editor's first tool. One stroke over the picture's top left: the picture sits
    # in the middle of the canvas, as tall as it.
    box = canvas.bounding_box()
    assert box is not None
    middle_x, middle_y, side = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["height"]
    page.mouse.move(middle_x - 0.3 * side, middle_y - 0.3 * side)
    page.mouse.down()
    for step in range(1, 6):
        page.mouse.move(middle_x - 0.3 * side + step * 0.04 * side, middle_y - 0.3 * side, steps=2)
    page.mouse.up()
    page.locator("#image-inpaint-area").get_by_text("Only masked").click()
    padding = page.get_by_label("Masked area padding", exact=True)
    padding.fill("4")
    padding.press("Tab")
    first = page.locator("#image-info").inner_text()
    page.locator("#image-generate").click()
    expect(page.locator("#image-info")).not_to_have_text(first, timeout=90_000)
    expect(page.locator("#image-info")).to_contain_text("seed", timeout=10_000)
    parameters = saved_parameters(page)
    assert "Mask blur: 4" in parameters, f"the painted stroke became a mask: {parameters}"
    assert "Inpaint area: Only masked, Masked area padding: 4" in parameters
    painted = np.asarray(Image.open(newest_png(page)).convert("RGB"), dtype=np.int16)
    assert np.array_equal(painted[48:, 48:], start[48:, 48:]), "far from the stroke nothing changed"
    assert np.abs(painted[:24, :32] - start[:24, :32]).max() > 0, "under the stroke it was repainted"
    shot(page, "inpaint-painted.png")
    page.close()
