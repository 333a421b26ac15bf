"""The Image tab: upload, paste or photograph an image, then ask about it (LLaVA)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from vision import VisionService
from webui.common import (
    MODEL_EVENT_CONCURRENCY,
    History,
    error_bubble,
    hint_bubble,
    plain_history,
    session_switch,
    stream_reply,
    without_errors,
)


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


def ask_button(vision: VisionService) -> dict[str, Any]:
    """Ask is only offered with a model behind it; a disabled button says why."""
    missing = vision.availability()
    return {"value": "Ask" if not missing else "Ask (no vision model: see Models)", "interactive": not missing}


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
        ask = gr.Button(variant="primary", scale=1, elem_id="vision-ask", **ask_button(vision))
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
        history = without_errors(history)
        if not image_path:
            yield gr.skip(), [*history, hint_bubble("Upload, paste or take a picture first; then ask about it.")]
            return
        asked = question.strip() or default_question
        earlier = plain_history(history)
        with session_switch(running, request) as cancel:
            try:
                stream = vision.stream(image_path, [*earlier, {"role": "user", "content": asked}], cancel=cancel)
            except Exception as error:  # the question stays in the box; the message goes where the answer would
                yield gr.skip(), [*history, error_bubble(error)]
                return
            yield from stream_reply(stream, history, question, shown_question=asked)

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
    limit = MODEL_EVENT_CONCURRENCY
    submitted = tab.question.submit(answer, inputs, outputs, api_name="describe", concurrency_limit=limit)
    clicked = tab.ask.click(answer, inputs, outputs, api_visibility="private", concurrency_limit=limit)
    after(submitted)
    after(clicked)
    # Stop sets the switch (it reaches the queue and the generation); the answer then ends with its mark.
    tab.stop.click(stop, None, None, api_visibility="private", queue=False)
    tab.clear.click(lambda: [], None, tab.chatbot, api_visibility="private")
    # A new image starts a new conversation.
    tab.image.change(lambda: [], None, tab.chatbot, api_visibility="private")
