"""The Image tab: upload, paste or photograph an image, then ask about it (LLaVA)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from vision import VisionService
from webui.common import History, as_gradio_error, plain_history, stream_reply


@dataclass(frozen=True)
class VisionTab:
    notice: gr.Markdown
    image: gr.Image
    chatbot: gr.Chatbot
    question: gr.Textbox
    ask: gr.Button
    stop: gr.Button
    clear: gr.Button


def vision_notice(vision: VisionService) -> str:
    """What the tab says above the image: missing files, or how the model runs."""
    missing = vision.availability()
    if missing:
        return f"⚠️ {missing}"
    return f"ℹ️ {vision.notice()}" if vision.notice() else ""


def build_vision_tab(vision: VisionService, default_question: str) -> VisionTab:
    text = vision_notice(vision)
    notice = gr.Markdown(text, visible=bool(text), elem_id="vision-notice")
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(
                label="Image",
                type="filepath",
                sources=["upload", "clipboard", "webcam"],
                height=380,
                elem_id="vision-image",
            )
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="About this image", height=380, elem_id="vision-chatbot")
    with gr.Row():
        question = gr.Textbox(
            placeholder=f"Ask about the image (Enter: “{default_question}”)",
            show_label=False,
            scale=8,
            elem_id="vision-question",
        )
        ask = gr.Button("Ask", variant="primary", scale=1, elem_id="vision-ask")
        stop = gr.Button("Stop", scale=1, elem_id="vision-stop")
        clear = gr.Button("Clear", scale=1, elem_id="vision-clear")
    return VisionTab(notice, image, chatbot, question, ask, stop, clear)


def make_vision_handler(
    vision: VisionService, default_question: str, running: dict[str, threading.Event]
) -> Callable[..., Iterator[tuple[Any, History]]]:
    """``running`` maps a browser session to the switch its Stop button sets, while an answer runs."""

    def answer(
        image_path: str | None, question: str, history: History, request: gr.Request
    ) -> Iterator[tuple[Any, History]]:
        if not image_path:
            raise gr.Error("Upload, paste or take a picture first; then ask about it.")
        asked = question.strip() or default_question
        earlier = plain_history(history)
        session = request.session_hash or ""
        cancel = running[session] = threading.Event()
        try:
            try:
                stream = vision.stream(image_path, [*earlier, {"role": "user", "content": asked}], cancel=cancel)
            except Exception as error:
                raise as_gradio_error(error) from None  # nothing yielded: the question stays in the box
            yield from stream_reply(stream, earlier, question, shown_question=asked)
        finally:
            if running.get(session) is cancel:
                del running[session]

    return answer


def wire_vision_tab(tab: VisionTab, vision: VisionService, default_question: str, after: Callable[[Any], None]) -> None:
    running: dict[str, threading.Event] = {}  # one Stop switch per browser session, while it has an answer running
    answer = make_vision_handler(vision, default_question, running)

    def stop(request: gr.Request) -> None:
        switch = running.get(request.session_hash or "")
        if switch is not None:
            switch.set()  # reaches the model manager's queue and the generation itself

    inputs = [tab.image, tab.question, tab.chatbot]
    outputs = [tab.question, tab.chatbot]
    submitted = tab.question.submit(answer, inputs, outputs, api_name="describe", concurrency_limit=1)
    clicked = tab.ask.click(answer, inputs, outputs, api_visibility="private", concurrency_limit=1)
    after(submitted)
    after(clicked)
    tab.stop.click(stop, None, None, cancels=[submitted, clicked], api_visibility="private", queue=False)
    tab.clear.click(lambda: [], None, tab.chatbot, api_visibility="private")
    # A new image starts a new conversation.
    tab.image.change(lambda: [], None, tab.chatbot, api_visibility="private")
