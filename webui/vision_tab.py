"""The Image tab: upload, paste or photograph an image, then ask about it (LLaVA)."""

from __future__ import annotations

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


def make_vision_handler(vision: VisionService, default_question: str) -> Callable[..., Iterator[tuple[Any, History]]]:
    def answer(image_path: str | None, question: str, history: History) -> Iterator[tuple[Any, History]]:
        if not image_path:
            raise gr.Error("Upload, paste or take a picture first; then ask about it.")
        asked = question.strip() or default_question
        earlier = plain_history(history)
        try:
            stream = vision.stream(image_path, [*earlier, {"role": "user", "content": asked}])
        except Exception as error:
            raise as_gradio_error(error) from None  # nothing yielded: the question stays in the box
        yield from stream_reply(stream, earlier, question, shown_question=asked)

    return answer


def wire_vision_tab(tab: VisionTab, vision: VisionService, default_question: str, after: Callable[[Any], None]) -> None:
    answer = make_vision_handler(vision, default_question)
    inputs = [tab.image, tab.question, tab.chatbot]
    outputs = [tab.question, tab.chatbot]
    submitted = tab.question.submit(answer, inputs, outputs, api_name="describe", concurrency_limit=1)
    clicked = tab.ask.click(answer, inputs, outputs, api_visibility="private", concurrency_limit=1)
    after(submitted)
    after(clicked)
    tab.stop.click(None, None, None, cancels=[submitted, clicked], api_visibility="private")
    tab.clear.click(lambda: [], None, tab.chatbot, api_visibility="private")
    # A new image starts a new conversation.
    tab.image.change(lambda: [], None, tab.chatbot, api_visibility="private")
