"""The Chat tab: a streaming conversation with the chat model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from chat import ChatService
from webui.common import History, as_gradio_error, plain_history, stream_reply


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


def make_chat_handler(chat: ChatService) -> Callable[..., Iterator[tuple[Any, History]]]:
    def respond(
        message: str,
        history: History,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        seed: float,
    ) -> Iterator[tuple[Any, History]]:
        if not message or not message.strip():
            yield gr.skip(), history  # an empty message is not sent
            return
        earlier = plain_history(history)
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
        yield from stream_reply(stream, earlier, message)

    return respond


def wire_chat_tab(tab: ChatTab, chat: ChatService, after: Callable[[Any], None]) -> None:
    """Connect the tab's events; ``after(event)`` chains what should follow each reply."""
    respond = make_chat_handler(chat)
    inputs = [tab.message, tab.chatbot, tab.system_prompt, tab.temperature, tab.top_p, tab.max_tokens, tab.seed]
    outputs = [tab.message, tab.chatbot]
    submitted = tab.message.submit(respond, inputs, outputs, api_name="chat", concurrency_limit=1)
    clicked = tab.send.click(respond, inputs, outputs, api_visibility="private", concurrency_limit=1)
    after(submitted)
    after(clicked)
    tab.stop.click(None, None, None, cancels=[submitted, clicked], api_visibility="private")
    tab.clear.click(lambda: ([], ""), None, [tab.chatbot, tab.message], api_visibility="private")
