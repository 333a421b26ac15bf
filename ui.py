"""The Gradio web UI: one builder per tab, then one wiring step for the events.

Handlers translate the services' typed errors into ``gr.Error`` at this edge, so
the browser shows a sentence, never a traceback, and the user's text is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from chat import ChatService
from errors import AppError
from model_manager import ManagerStatus
from services import Services
from text_generation import Message

MIB = 2**20
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Plain helpers (no Gradio state)
# ----------------------------------------------------------------------------


def text_of(content: Any) -> str:
    """Chatbot content arrives as a string or a list of typed parts; keep the text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def plain_history(history: list[dict[str, Any]]) -> list[Message]:
    return [
        {"role": m["role"], "content": text_of(m.get("content"))}
        for m in history
        if m.get("role") in ("user", "assistant")
    ]


def format_size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / MIB:.0f} MiB"


def format_status(status: ManagerStatus) -> str:
    lines = [
        f"**Device:** {status.device} · **Policy:** {status.policy} · **Budget:** {format_size(status.budget_bytes)}",
        "",
    ]
    if status.resident:
        lines += ["| Model | State | In use | Memory | Load time | Idle |", "|---|---|---|---|---|---|"]
        for m in status.resident:
            lines.append(
                f"| {m.label} | {m.state} | {m.refs} | {format_size(m.size_bytes)} | "
                f"{m.load_seconds:.2f} s | {m.idle_seconds:.0f} s |"
            )
    else:
        lines.append("No model is loaded; the next request loads one.")
    if status.history:
        last = status.history[-1]
        when = time.strftime("%H:%M:%S", time.localtime(last.at))
        lines += ["", f"Last: {last.action} {last.label} in {last.seconds:.2f} s at {when}"]
    return "\n".join(lines)


def as_gradio_error(error: Exception) -> gr.Error:
    """Typed errors carry a message for the user; anything else is a bug: log it, say so."""
    if isinstance(error, AppError):
        return gr.Error(str(error))
    log.error("unexpected error in the UI", exc_info=error)
    return gr.Error(f"Unexpected error ({type(error).__name__}: {error}). The app keeps running; the log has details.")


# ----------------------------------------------------------------------------
# Tabs
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTab:
    chatbot: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
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
        message = gr.Textbox(
            placeholder="Type a message and press Enter",
            show_label=False,
            scale=8,
            lines=1,
            max_lines=8,
            elem_id="chat-input",
        )
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        stop = gr.Button("Stop", scale=1, elem_id="chat-stop")
        clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
    with gr.Accordion("Parameters", open=False):
        system = gr.Textbox(label="System prompt", value=system_prompt, lines=2)
        with gr.Row():
            temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.01, label="Top p")
            max_tokens = gr.Slider(1, 4096, value=defaults.max_tokens, step=1, label="Max new tokens")
            seed = gr.Number(value=defaults.seed, precision=0, label="Seed (-1: random)")
    return ChatTab(chatbot, message, send, stop, clear, system, temperature, top_p, max_tokens, seed)


def build_status_panel() -> gr.Markdown:
    with gr.Accordion("Models in memory", open=True):
        return gr.Markdown(elem_id="model-status")


# ----------------------------------------------------------------------------
# Events
# ----------------------------------------------------------------------------


def make_chat_handler(chat: ChatService):
    def respond(
        message: str,
        history: list[dict[str, Any]],
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        seed: float,
    ) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
        if not message or not message.strip():
            yield gr.skip(), history  # an empty message is not sent
            return
        earlier = plain_history(history or [])
        try:
            params = chat.defaults.override(
                temperature=temperature,
                top_p=top_p,
                max_tokens=int(max_tokens),
                seed=int(seed) if seed is not None else None,
            )
            stream = chat.stream([*earlier, {"role": "user", "content": message}], params, system_prompt=system_prompt)
        except Exception as error:
            raise as_gradio_error(error) from None  # nothing yielded: the text stays in the box
        shown: list[dict[str, Any]] = [
            *earlier,
            {"role": "user", "content": message},
            {"role": "assistant", "content": ""},
        ]
        yield "", shown
        try:
            for piece in stream:
                shown[-1]["content"] += piece
                yield gr.skip(), shown
        except Exception as error:
            yield message, earlier  # give the text back; nothing is lost
            raise as_gradio_error(error) from None
        finally:
            stream.close()
        if stream.finish_reason == "length":
            shown[-1]["content"] += " …"
            yield gr.skip(), shown

    return respond


def wire_events(demo: gr.Blocks, tab: ChatTab, notice: gr.Markdown, status: gr.Markdown, services: Services) -> None:
    respond = make_chat_handler(services.chat)

    def refresh_status() -> tuple[Any, str]:
        try:
            text = services.chat.resolve_model().notice
        except AppError as error:
            text = str(error)
        banner = gr.update(value=f"⚠️ {text}" if text else "", visible=bool(text))
        return banner, format_status(services.manager.status())

    inputs = [tab.message, tab.chatbot, tab.system_prompt, tab.temperature, tab.top_p, tab.max_tokens, tab.seed]
    outputs = [tab.message, tab.chatbot]
    submitted = tab.message.submit(respond, inputs, outputs, api_name="chat", concurrency_limit=1)
    clicked = tab.send.click(respond, inputs, outputs, api_visibility="private", concurrency_limit=1)
    for event in (submitted, clicked):
        event.then(refresh_status, None, [notice, status], show_progress="hidden", api_visibility="private")
    tab.stop.click(None, None, None, cancels=[submitted, clicked], api_visibility="private")
    tab.clear.click(lambda: ([], ""), None, [tab.chatbot, tab.message], api_visibility="private")
    timer = gr.Timer(2.0)
    timer.tick(refresh_status, None, [notice, status], show_progress="hidden", api_visibility="private")
    demo.load(refresh_status, None, [notice, status], api_visibility="private")


def build_ui(services: Services, system_prompt: str) -> gr.Blocks:
    with gr.Blocks(title="Enclave — local AI workstation") as demo:
        gr.Markdown("## Enclave · local AI workstation\nEverything runs on this machine; nothing leaves it.")
        notice = gr.Markdown(visible=False, elem_id="model-notice")
        with gr.Tabs(), gr.Tab("Chat", id="chat"):
            chat_tab = build_chat_tab(services.chat, system_prompt)
        status = build_status_panel()
        wire_events(demo, chat_tab, notice, status, services)
    demo.queue(default_concurrency_limit=1)
    return demo
