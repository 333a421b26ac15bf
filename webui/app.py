"""Assemble the web UI: a banner for notices, one tab per module, the status panel,
then the wiring that connects events (a handler on one tab may update another)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from assistant.dispatch import Assistant
from errors import AppError
from services import Services
from settings import Settings
from webui.chat_tab import build_chat_tab, wire_chat_tab
from webui.common import format_status
from webui.image_tab import build_image_tab, wire_image_tab
from webui.vision_tab import build_vision_tab, wire_vision_tab


def build_ui(services: Services, settings: Settings, assistant: Assistant) -> gr.Blocks:
    with gr.Blocks(title="Enclave — local AI workstation") as demo:
        gr.Markdown("## Enclave · local AI workstation\nEverything runs on this machine; nothing leaves it.")
        notice = gr.Markdown(visible=False, elem_id="model-notice")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat_tab = build_chat_tab(services.chat, settings.chat.system_prompt)
            with gr.Tab("Image", id="vision"):
                vision_tab = build_vision_tab(services.vision, settings.vision.default_question)
            with gr.Tab("Text to image", id="image"):
                image_tab = build_image_tab(services.images, settings.image)
        with gr.Accordion("Models in memory", open=True):
            status = gr.Markdown(elem_id="model-status")

        def refresh_status() -> tuple[Any, str]:
            try:
                text = services.chat.resolve_model().notice
            except AppError as error:
                text = str(error)
            banner = gr.update(value=f"⚠️ {text}" if text else "", visible=bool(text))
            return banner, format_status(services.manager.status())

        def after(event: Any) -> None:
            event.then(refresh_status, None, [notice, status], show_progress="hidden", api_visibility="private")

        wire_chat_tab(chat_tab, assistant, after)
        wire_vision_tab(vision_tab, services.vision, settings.vision.default_question, after)
        wire_image_tab(image_tab, services.images, after)
        gr.Timer(2.0).tick(refresh_status, None, [notice, status], show_progress="hidden", api_visibility="private")
        demo.load(refresh_status, None, [notice, status], api_visibility="private")
    demo.queue(default_concurrency_limit=1)
    return demo
