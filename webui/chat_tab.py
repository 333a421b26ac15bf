"""The Chat tab: the assistant. It chats, answers about an attached image and draws.

Each message is routed (assistant.py): an attached image goes to the vision model,
a request to draw to the image generator, the rest to the chat model. Every answer
shows where it went and why; generated images appear inline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from assistant.dispatch import Assistant, Drawing, PendingDrawing, route_title
from assistant.routing import RouteDecision
from chat import ChatService
from webui.common import History, as_gradio_error, plain_history, stream_into

Update = tuple[Any, History, str | None]  # (input box, chatbot, the image the conversation is about)


@dataclass(frozen=True)
class ChatTab:
    chatbot: gr.Chatbot
    message: gr.MultimodalTextbox
    active_image: gr.State
    stop: gr.Button
    clear: gr.Button
    system_prompt: gr.Textbox
    temperature: gr.Slider
    top_p: gr.Slider
    max_tokens: gr.Slider
    repeat_penalty: gr.Slider
    seed: gr.Number


def build_chat_tab(chat: ChatService, system_prompt: str) -> ChatTab:
    defaults = chat.defaults
    chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chatbot")
    with gr.Row():
        message = gr.MultimodalTextbox(
            placeholder="Message, a picture to ask about, or “draw …” — Enter sends",
            file_types=["image"],
            file_count="single",
            sources=["upload"],
            show_label=False,
            scale=8,
            elem_id="chat-input",
        )
        stop = gr.Button("Stop", scale=1, elem_id="chat-stop")
        clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
    gr.Markdown(
        "Commands: `/draw …` or `/image …` makes a picture, `/describe …` asks about the attached picture, "
        "`/chat …` talks to the chat model. Without a command the request is recognised (English and German).",
        elem_classes=["hint"],
    )
    with gr.Accordion("Parameters", open=False):
        system = gr.Textbox(label="System prompt", value=system_prompt, lines=2)
        with gr.Row():
            temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.01, label="Top p")
            max_tokens = gr.Slider(1, 4096, value=defaults.max_tokens, step=1, label="Max new tokens")
            repeat_penalty = gr.Slider(
                0.5, 2, value=defaults.repeat_penalty, step=0.05, label="Repeat penalty (1: off)"
            )
            seed = gr.Number(value=defaults.seed, precision=0, label="Seed (-1: random)")
    active_image = gr.State(None)
    return ChatTab(
        chatbot, message, active_image, stop, clear, system, temperature, top_p, max_tokens, repeat_penalty, seed
    )


def note(decision: RouteDecision, text: str = "") -> dict[str, Any]:
    """The small collapsible line that says where a message went and why."""
    body = "\n\n".join(part for part in (text, decision.hint or "") if part)
    return {"role": "assistant", "content": body, "metadata": {"title": route_title(decision), "status": "done"}}


def drawing_messages(drawing: Drawing) -> list[dict[str, Any]]:
    result = drawing.result
    messages: list[dict[str, Any]] = [
        {"role": "assistant", "content": {"path": str(item.path), "alt_text": drawing.prompt.prompt}}
        for item in result.images
        if item.path is not None
    ]
    seeds = ", ".join(str(item.seed) for item in result.images)
    summary = f"{result.model}, seed {seeds}, {result.seconds:.1f} s" + (" (cancelled)" if result.cancelled else "")
    used = f"Prompt used: {drawing.prompt.prompt}"
    if drawing.prompt.negative_prompt:
        used += f"  \nNegative prompt: {drawing.prompt.negative_prompt}"
    messages.append({"role": "assistant", "content": f"{used}  \n{summary}"})
    return messages


def make_chat_handler(assistant: Assistant, running: dict[str, threading.Event]) -> Callable[..., Iterator[Update]]:
    """``running`` maps a browser session to the switch its Stop button sets, while a reply runs."""

    def respond(
        message: dict[str, Any] | None,
        history: History,
        active_image: str | None,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        repeat_penalty: float,
        seed: float,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to ask for a progress bar
    ) -> Iterator[Update]:
        text = (message or {}).get("text") or ""
        files = (message or {}).get("files") or []
        attached = str(files[-1]) if files else None
        if not text.strip() and not attached:
            yield gr.skip(), history, active_image  # an empty message is not sent
            return
        session = request.session_hash or ""
        cancel = running[session] = threading.Event()
        sampling = {
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": int(max_tokens),
            "repeat_penalty": repeat_penalty,
            "seed": int(seed) if seed is not None else None,
        }
        try:
            yield from answer_message(
                message, text, attached, history, active_image, system_prompt, sampling, cancel, progress
            )
        finally:
            if running.get(session) is cancel:
                del running[session]

    def answer_message(
        message: dict[str, Any] | None,
        text: str,
        attached: str | None,
        history: History,
        active_image: str | None,
        system_prompt: str,
        sampling: dict[str, Any],
        cancel: threading.Event,
        progress: gr.Progress,
    ) -> Iterator[Update]:
        image = attached or active_image
        history = list(history or [])
        try:
            answer = assistant.answer(
                text,
                image=image,
                history=plain_history(history),
                overrides=sampling,
                system_prompt=system_prompt,
                cancel=cancel,
            )
        except Exception as error:
            raise as_gradio_error(error) from None  # nothing yielded: the message stays in the box
        decision = answer.decision
        shown = [*history]
        if attached:
            shown.append({"role": "user", "content": {"path": attached}})
        if text.strip():
            shown.append({"role": "user", "content": text})
        if answer.hint_only:
            yield "", [*shown, note(decision)], image
            return
        shown.append(note(decision))
        if answer.drawing is not None:
            yield from draw(answer.drawing, shown, message, history, active_image, progress)
            return
        assert answer.text is not None
        keep_image = image if decision.route == "vision" else active_image
        yield "", shown, keep_image
        try:
            for chatbot in stream_into(answer.text, shown):
                yield gr.skip(), chatbot, keep_image
        except Exception as error:
            yield message, history, active_image  # give the message back; nothing is lost
            raise as_gradio_error(error) from None

    def draw(
        drawing: PendingDrawing,
        shown: History,
        message: dict[str, Any] | None,
        history: History,
        active_image: str | None,
        progress: gr.Progress,
    ) -> Iterator[Update]:
        yield "", shown, active_image
        try:
            prompt = drawing.prompt()
            shown[-1] = note(drawing.decision, f"Prompt written by the {prompt.by}: {prompt.prompt}")
            yield gr.skip(), shown, active_image
            done = drawing.draw(lambda step, total: progress((step, total), desc="Drawing", unit="steps"))
        except Exception as error:
            yield message, history, active_image  # give the request back; nothing is lost
            raise as_gradio_error(error) from None
        yield gr.skip(), [*shown, *drawing_messages(done)], active_image

    return respond


def wire_chat_tab(tab: ChatTab, assistant: Assistant, after: Callable[[Any], None]) -> None:
    """Connect the tab's events; ``after(event)`` chains what should follow each reply."""
    running: dict[str, threading.Event] = {}  # one Stop switch per browser session, while it has a reply running
    respond = make_chat_handler(assistant, running)

    def stop(request: gr.Request) -> None:
        switch = running.get(request.session_hash or "")
        if switch is not None:
            switch.set()

    inputs = [
        tab.message,
        tab.chatbot,
        tab.active_image,
        tab.system_prompt,
        tab.temperature,
        tab.top_p,
        tab.max_tokens,
        tab.repeat_penalty,
        tab.seed,
    ]
    outputs = [tab.message, tab.chatbot, tab.active_image]
    submitted = tab.message.submit(respond, inputs, outputs, api_name="chat", concurrency_limit=1)
    after(submitted)
    tab.stop.click(stop, None, None, cancels=[submitted], api_visibility="private", queue=False)
    tab.clear.click(
        lambda: ([], None, None), None, [tab.chatbot, tab.message, tab.active_image], api_visibility="private"
    )
