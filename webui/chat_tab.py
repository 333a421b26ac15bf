"""The Chat tab: the assistant. It chats, answers about an attached image and draws.

Each message is routed (assistant.py): an attached image goes to the vision model,
a request to draw to the image generator, the rest to the chat model. Every answer
shows where it went and why; generated images appear inline. A failed turn shows its
message in the conversation and gives the message back to the input box. Every turn is
saved (``conversations_panel``): when it starts, and when its answer is complete.
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
from generator import ImageService
from text_generation.stream import GenerationParams
from webui.common import (
    MODEL_EVENT_CONCURRENCY,
    STOPPED_MARK,
    History,
    error_bubble,
    for_user_only,
    hint_bubble,
    plain_history,
    session_switch,
    stream_into,
    text_of,
    without_errors,
)
from webui.conversations_panel import Saver
from webui.fields import Bounds, number_field, problems, watch_fields
from webui.history import conversation_image

Update = tuple[Any, History, str]  # (input box, chatbot, the saved conversation's id)
LENGTH_MARK = " …"

SAMPLING_BOUNDS = (
    Bounds("Temperature", 0, 2),
    Bounds("Top p", 0.01, 1),
    Bounds("Max new tokens", 1, 32768, integer=True),
    Bounds("Repeat penalty (1: off)", 0.5, 2),
    Bounds("Seed (-1: random)", 0, 2**31 - 1, integer=True, special=-1),
)


@dataclass(frozen=True)
class ChatTab:
    chatbot: gr.Chatbot
    message: gr.MultimodalTextbox
    stop: gr.Button
    resume: gr.Button
    commands: gr.Markdown
    system_prompt: gr.Textbox
    temperature: gr.Number
    top_p: gr.Number
    max_tokens: gr.Number
    repeat_penalty: gr.Number
    seed: gr.Number
    field_problems: gr.Markdown

    @property
    def sampling(self) -> list[gr.Number]:
        return [self.temperature, self.top_p, self.max_tokens, self.repeat_penalty, self.seed]


def commands_hint(images: ImageService, vision_missing: str | None) -> str:
    """The line under the input: what can be asked, given what is installed."""
    parts = []
    if images.availability() is None:
        parts.append("`/draw …` or `/image …` makes a picture")
    else:
        parts.append("drawing needs an image model (see the Models tab)")
    if vision_missing is None:
        parts.append("`/describe …` asks about the attached picture")
    else:
        parts.append("questions about pictures need the vision model (see the Models tab)")
    parts.append("`/chat …` talks to the chat model")
    return "Commands: " + ", ".join(parts) + ". Without a command the request is recognised (English and German)."


def build_chat_tab(defaults: GenerationParams, system_prompt: str, commands: str) -> ChatTab:
    chatbot = gr.Chatbot(
        label="Conversation",
        height="60vh",
        editable="user",
        elem_id="chatbot",
        buttons=["copy", "copy_all"],
    )
    with gr.Row(elem_id="chat-input-row", equal_height=True):
        message = gr.MultimodalTextbox(
            placeholder="Message, a picture to ask about, or “draw …” — Enter sends",
            file_types=["image"],
            file_count="single",
            sources=["upload"],
            show_label=False,
            scale=8,
            min_width=160,
            elem_id="chat-input",
        )
        stop = gr.Button("Stop", scale=1, min_width=60, elem_id="chat-stop")
        resume = gr.Button("Continue", scale=1, min_width=60, elem_id="chat-continue")
    hint = gr.Markdown(commands, elem_classes=["hint"], elem_id="chat-commands")
    with gr.Accordion("Parameters", open=False):
        system = gr.Textbox(label="System prompt", value=system_prompt, lines=2)
        with gr.Row():
            values = (defaults.temperature, defaults.top_p, defaults.max_tokens, defaults.repeat_penalty, defaults.seed)
            fields = [number_field(bounds, value) for bounds, value in zip(SAMPLING_BOUNDS, values, strict=True)]
        field_problems = gr.Markdown(visible=False, elem_id="chat-field-problems", elem_classes=["field-problems"])
    return ChatTab(chatbot, message, stop, resume, hint, system, *fields, field_problems)


def checked_sampling(
    temperature: float, top_p: float, max_tokens: float, repeat_penalty: float, seed: float
) -> dict[str, Any] | str:
    """The sampling values as the model takes them, or what is wrong with them (nothing is changed)."""
    values = (temperature, top_p, max_tokens, repeat_penalty, seed)
    found = problems(list(zip(SAMPLING_BOUNDS, values, strict=True)))
    if found:
        return "\n".join(found)
    return {
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": int(max_tokens),
        "repeat_penalty": repeat_penalty,
        "seed": int(seed),
    }


def note(decision: RouteDecision, text: str = "") -> dict[str, Any]:
    """The small collapsible line that says where a message went and why."""
    return {"role": "assistant", "content": text, "metadata": {"title": route_title(decision), "status": "done"}}


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


def last_reply_index(history: History) -> int | None:
    """Where the newest model-written reply is, if the conversation ends with one."""
    for index in range(len(history) - 1, -1, -1):
        message = history[index]
        if message.get("role") == "user":
            return None
        if not for_user_only(message) and isinstance(text_of(message.get("content")), str):
            return index if text_of(message.get("content")) else None
    return None


def last_user_text_index(history: History) -> int | None:
    for index in range(len(history) - 1, -1, -1):
        if history[index].get("role") == "user" and text_of(history[index].get("content")):
            return index
    return None


@dataclass
class ChatHandlers:
    """The tab's handlers; ``running`` maps a browser session to the switch its Stop button sets."""

    assistant: Assistant
    chat: ChatService
    saver: Saver
    running: dict[str, threading.Event]

    def respond(
        self,
        message: dict[str, Any] | None,
        history: History,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        repeat_penalty: float,
        seed: float,
        conversation: str,
        owner: str,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to ask for a progress bar
    ) -> Iterator[Update]:
        text = (message or {}).get("text") or ""
        files = (message or {}).get("files") or []
        attached = str(files[-1]) if files else None
        if not text.strip() and not attached:
            yield gr.skip(), history, conversation  # an empty message is not sent
            return
        history = without_errors(history)
        sampling = checked_sampling(temperature, top_p, max_tokens, repeat_penalty, seed)
        if isinstance(sampling, str):  # refused as typed, in the conversation: the message stays in the box
            yield gr.skip(), [*history, error_bubble(sampling)], conversation
            return
        with session_switch(self.running, request) as cancel:
            yield from self._answer(message, text, attached, history, system_prompt, sampling, cancel, progress, (
                conversation, owner
            ))  # fmt: skip

    def _answer(
        self,
        message: dict[str, Any] | None,
        text: str,
        attached: str | None,
        history: History,
        system_prompt: str,
        sampling: dict[str, Any],
        cancel: threading.Event,
        progress: gr.Progress,
        saved: tuple[str, str],
    ) -> Iterator[Update]:
        conversation, owner = saved
        image = attached or conversation_image(history)
        try:
            answer = self.assistant.answer(
                text,
                image=image,
                history=plain_history(history),
                overrides=sampling,
                system_prompt=system_prompt,
                cancel=cancel,
            )
        except Exception as error:  # the message stays in the box; the reason shows in the conversation
            yield gr.skip(), [*history, error_bubble(error)], conversation
            return
        decision = answer.decision
        shown = [*history]
        if attached:
            shown.append({"role": "user", "content": {"path": attached}})
        if text.strip():
            shown.append({"role": "user", "content": text})
        shown.append(note(decision))
        if decision.hint:
            shown.append(hint_bubble(decision.hint))
        conversation = self.saver.save(owner, conversation, shown)
        if answer.hint_only:
            yield "", shown, conversation
            return
        yield "", shown, conversation
        if answer.drawing is not None:
            done = yield from self._draw(answer.drawing, shown, message, history, conversation, progress)
        else:
            assert answer.text is not None
            done = yield from self._stream(answer.text, shown, message, history, conversation)
        self.saver.save(owner, conversation, done)

    def _stream(
        self, stream: Any, shown: History, message: Any, history: History, conversation: str
    ) -> Iterator[Update]:
        chatbot = shown
        try:
            for chatbot in stream_into(stream, shown):
                yield gr.skip(), chatbot, conversation
        except Exception as error:  # give the message back; the reason shows where the answer would be
            chatbot = [*history, error_bubble(error)]
            yield message, chatbot, conversation
        return chatbot

    def _draw(
        self,
        drawing: PendingDrawing,
        shown: History,
        message: Any,
        history: History,
        conversation: str,
        progress: gr.Progress,
    ) -> Iterator[Update]:
        try:
            prompt = drawing.prompt()
            index = next(i for i in range(len(shown) - 1, -1, -1) if (shown[i].get("metadata") or {}).get("title"))
            shown[index] = note(drawing.decision, f"Prompt written by the {prompt.by}: {prompt.prompt}")
            yield gr.skip(), shown, conversation
            done = drawing.draw(lambda step, total: progress((step, total), desc="Drawing", unit="steps"))
        except Exception as error:  # give the request back; the reason shows where the picture would be
            failed = [*history, error_bubble(error)]
            yield message, failed, conversation
            return failed
        finished = [*shown, *drawing_messages(done)]
        yield gr.skip(), finished, conversation
        return finished

    def regenerate(
        self,
        history: History,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        repeat_penalty: float,
        seed: float,
        conversation: str,
        owner: str,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008
    ) -> Iterator[Update]:
        """Answer the last message again: the reply after it is replaced."""
        history = without_errors(history)
        index = last_user_text_index(history)
        if index is None:
            yield gr.skip(), [*history, hint_bubble("There is no message to answer again.")], conversation
            return
        message = {"text": text_of(history[index].get("content")), "files": []}
        settings = (system_prompt, temperature, top_p, max_tokens, repeat_penalty, seed, conversation, owner)
        yield from self.respond(message, history[:index], *settings, request, progress)

    def edit(
        self,
        history: History,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        repeat_penalty: float,
        seed: float,
        conversation: str,
        owner: str,
        edited: gr.EditData,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008
    ) -> Iterator[Update]:
        """A user message was edited in place: the conversation continues from the edited message."""
        index = edited.index if isinstance(edited.index, int) else edited.index[0]
        if not 0 <= index < len(history) or history[index].get("role") != "user":
            yield gr.skip(), gr.skip(), gr.skip()
            return
        text = edited.value if isinstance(edited.value, str) else text_of(edited.value)
        settings = (system_prompt, temperature, top_p, max_tokens, repeat_penalty, seed, conversation, owner)
        yield from self.respond({"text": text, "files": []}, history[:index], *settings, request, progress)

    def resume(
        self,
        history: History,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        repeat_penalty: float,
        seed: float,
        conversation: str,
        owner: str,
        request: gr.Request,
    ) -> Iterator[Update]:
        """Continue a reply that was stopped or ran out of tokens."""
        history = without_errors(history)
        index = last_reply_index(history)
        routed_to_chat = any(
            (m.get("metadata") or {}).get("title", "").startswith("→ chat model") for m in history[-4:]
        )
        if index is None or not routed_to_chat:
            yield gr.skip(), [*history, hint_bubble("Continue goes on with the chat model's last reply.")], conversation
            return
        sampling = checked_sampling(temperature, top_p, max_tokens, repeat_penalty, seed)
        if isinstance(sampling, str):
            yield gr.skip(), [*history, error_bubble(sampling)], conversation
            return
        reply = text_of(history[index]["content"]).removesuffix(STOPPED_MARK).rstrip().removesuffix("…").rstrip()
        shown = [*history[:index], {**history[index], "content": reply}]
        params = self.chat.defaults.override(**sampling)
        with session_switch(self.running, request) as cancel:
            try:
                stream = self.chat.stream(
                    plain_history(shown), params, system_prompt=system_prompt, cancel=cancel, continuing=True
                )
            except Exception as error:
                yield gr.skip(), [*history, error_bubble(error)], conversation
                return
            done = shown
            try:
                for done in stream_into(stream, shown[:-1]):
                    done[-1] = {**shown[-1], "content": reply + text_of(done[-1]["content"])}
                    yield gr.skip(), done, conversation
            except Exception as error:
                done = [*history, error_bubble(error)]
                yield gr.skip(), done, conversation
            self.saver.save(owner, conversation, done)

    def stop(self, request: gr.Request) -> None:
        switch = self.running.get(request.session_hash or "")
        if switch is not None:
            switch.set()  # reaches the model manager's queue and the generation; the reply gets its mark


def wire_chat_tab(
    tab: ChatTab,
    handlers: ChatHandlers,
    conversation: gr.State,
    owner: gr.State,
    after: Callable[[Any], None],
) -> list[Any]:
    """Connect the tab's events; ``after(event)`` chains what should follow each reply.
    Returns the events that change the conversation."""
    inputs = [tab.chatbot, tab.system_prompt, *tab.sampling, conversation, owner]
    outputs = [tab.message, tab.chatbot, conversation]
    private: dict[str, Any] = {"api_visibility": "private", "concurrency_limit": MODEL_EVENT_CONCURRENCY}
    events = [
        tab.message.submit(
            handlers.respond,
            [tab.message, *inputs],
            outputs,
            api_name="chat",
            concurrency_limit=MODEL_EVENT_CONCURRENCY,
        )
    ]
    for listen, handler in (
        (tab.chatbot.retry, handlers.regenerate),
        (tab.chatbot.edit, handlers.edit),
        (tab.resume.click, handlers.resume),
    ):
        events.append(listen(handler, inputs, outputs, **private))
    for event in events:
        after(event)
    tab.stop.click(handlers.stop, None, None, api_visibility="private", queue=False)
    # The chatbot's own Clear starts a new conversation: the saved one stays as it was.
    tab.chatbot.clear(lambda: "", None, conversation, api_visibility="private")
    fields = list(zip(SAMPLING_BOUNDS, tab.sampling, strict=True))
    watch_fields(fields, tab.field_problems)
    return events
