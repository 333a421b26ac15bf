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

from assistant import Assistant, Drawing, route_title
from chat import ChatService
from router import RouteDecision
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
            seed = gr.Number(value=defaults.seed, precision=0, label="Seed (-1: random)")
    active_image = gr.State(None)
    return ChatTab(chatbot, message, active_image, stop, clear, system, temperature, top_p, max_tokens, seed)


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


def make_chat_handler(
    assistant: Assistant, chat: ChatService, running: dict[str, threading.Event]
) -> Callable[..., Iterator[Update]]:
    """``running`` maps a browser session to the switch its Stop button sets."""

    def respond(
        message: dict[str, Any] | None,
        history: History,
        active_image: str | None,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        seed: float,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to ask for a progress bar
    ) -> Iterator[Update]:
        cancel = running[request.session_hash or ""] = threading.Event()
        text = (message or {}).get("text") or ""
        files = (message or {}).get("files") or []
        attached = str(files[-1]) if files else None
        if not text.strip() and not attached:
            yield gr.skip(), history, active_image  # an empty message is not sent
            return
        image = attached or active_image
        history = list(history or [])
        earlier = plain_history(history)
        try:
            decision = assistant.decide(text, has_image=image is not None)
            params = chat.defaults.override(
                temperature=temperature,
                top_p=top_p,
                max_tokens=int(max_tokens),
                seed=int(seed) if seed is not None else None,
            )
        except Exception as error:
            raise as_gradio_error(error) from None  # nothing yielded: the message stays in the box
        shown = [*history]
        if attached:
            shown.append({"role": "user", "content": {"path": attached}})
        if text.strip():
            shown.append({"role": "user", "content": text})
        if decision.hint and not decision.prompt.strip() and decision.route != "vision":
            yield "", [*shown, note(decision)], image  # only a hint to show: nothing to answer
            return
        shown.append(note(decision))
        if decision.route == "image":
            yield from draw(decision, shown, message, history, active_image, progress, cancel)
            return
        try:
            if decision.route == "vision":
                stream = assistant.look(image or "", earlier, decision, cancel=cancel)
            else:
                stream = assistant.chat(earlier, decision, params, system_prompt=system_prompt, cancel=cancel)
        except Exception as error:
            yield message, history, active_image
            raise as_gradio_error(error) from None
        keep_image = image if decision.route == "vision" else active_image
        yield "", shown, keep_image
        try:
            for chatbot in stream_into(stream, shown):
                yield gr.skip(), chatbot, keep_image
        except Exception as error:
            yield message, history, active_image  # give the message back; nothing is lost
            raise as_gradio_error(error) from None

    def draw(
        decision: RouteDecision,
        shown: History,
        message: dict[str, Any] | None,
        history: History,
        active_image: str | None,
        progress: gr.Progress,
        cancel: threading.Event,
    ) -> Iterator[Update]:
        yield "", shown, active_image
        try:
            prompt = assistant.image_prompt(decision)
            shown[-1] = note(decision, f"Prompt written by the {prompt.by}: {prompt.prompt}")
            yield gr.skip(), shown, active_image
            result = assistant.draw(
                prompt,
                progress=lambda step, total: progress((step, total), desc="Drawing", unit="steps"),
                cancel=cancel,
            )
        except Exception as error:
            yield message, history, active_image  # give the request back; nothing is lost
            raise as_gradio_error(error) from None
        yield gr.skip(), [*shown, *drawing_messages(Drawing(prompt, result))], active_image

    return respond


def wire_chat_tab(tab: ChatTab, assistant: Assistant, chat: ChatService, after: Callable[[Any], None]) -> None:
    """Connect the tab's events; ``after(event)`` chains what should follow each reply."""
    running: dict[str, threading.Event] = {}  # one Stop switch per browser session
    respond = make_chat_handler(assistant, chat, running)

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
        tab.seed,
    ]
    outputs = [tab.message, tab.chatbot, tab.active_image]
    submitted = tab.message.submit(respond, inputs, outputs, api_name="chat", concurrency_limit=1)
    after(submitted)
    tab.stop.click(stop, None, None, cancels=[submitted], api_visibility="private", queue=False)
    tab.clear.click(
        lambda: ([], None, None), None, [tab.chatbot, tab.message, tab.active_image], api_visibility="private"
    )
