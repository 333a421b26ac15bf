"""Assemble the web UI: the saved conversations in a sidebar, a banner for notices, one tab
per module and the Models tab, the status panel; then the wiring that connects events (a
handler on one tab may update another)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from assistant.dispatch import Assistant
from conversations.store import ConversationStore
from errors import AppError
from services import Services
from settings import Settings
from webui.chat_tab import ChatHandlers, build_chat_tab, commands_hint, wire_chat_tab
from webui.common import format_status
from webui.conversations_panel import (
    SHARED_OWNER,
    Saver,
    build_conversations_panel,
    listing_update,
    new_browser_id,
    refresh_listing_after,
    wire_conversations_panel,
)
from webui.image_tab import build_image_tab, generate_button, lora_choices, wire_image_tab
from webui.models_tab import build_models_tab, models_view, wire_models_tab
from webui.vision_tab import ask_button, build_vision_tab, vision_notice, wire_vision_tab
from webui.voice import (
    VoiceHandlers,
    build_voice_controls,
    microphone_offer,
    speak_offer,
    wire_voice_controls,
)

# Phones (390 px wide): Stop stays in reach under the conversation while a reply streams, the
# status and models tables scroll sideways instead of wrapping letter by letter, and the
# Text-to-image gallery comes right after the Generate button.
UI_CSS = """
.field-problems p { color: var(--error-text-color, #b91c1c); margin: 0.2em 0; }
#model-status table, .wide-table table { display: block; overflow-x: auto; }
#model-status td, #model-status th, .wide-table td, .wide-table th { white-space: nowrap; }
@media (max-width: 640px) {
  #chatbot { height: 46vh !important; max-height: 46vh !important; }
  #chat-input-row { position: sticky; bottom: 0; z-index: 20; flex-wrap: wrap !important; gap: 4px;
                    background: var(--background-fill-primary); padding-bottom: 4px; }
  #chat-input-row > .form { flex: 1 1 100% !important; min-width: 100% !important; }
  #chat-stop, #chat-continue { flex: 1 1 40% !important; min-height: 36px !important; max-height: 40px; }
  #image-gallery { min-height: 200px; }
}
"""

BROWSER_STORAGE_KEY = "enclave-browser-id"
CLOSE_SIDEBAR_ON_PHONES = """() => {
  if (window.innerWidth < 700) document.querySelector('#conversations.open .toggle-button')?.click();
}"""


def build_ui(
    services: Services, settings: Settings, assistant: Assistant, store: ConversationStore, exports_dir: Path
) -> gr.Blocks:
    per_browser = bool(settings.server.api_key)
    with gr.Blocks(title="Enclave — local AI workstation") as demo:
        conversation = gr.State("")
        owner = gr.State(SHARED_OWNER)
        # Gradio encrypts browser storage with a key it sends to the page, random per start unless given: a
        # fixed one lets a browser find its list after a restart. The id itself is random (128 bits), which is
        # what keeps one browser from opening another's list.
        browser_id = gr.BrowserState("", storage_key="enclave-browser-id", secret=BROWSER_STORAGE_KEY)
        with gr.Sidebar(label="Conversations", open=True, elem_id="conversations"):
            panel = build_conversations_panel()
        gr.Markdown("## Enclave · local AI workstation\nEverything runs on this machine; nothing leaves it.")
        notice = gr.Markdown(visible=False, elem_id="model-notice")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat_tab = build_chat_tab(
                    services.chat.defaults,
                    settings.chat.system_prompt,
                    commands_hint(services.images, services.vision.availability()),
                )
                voice = build_voice_controls(services.transcriber, services.speaker)
            with gr.Tab("Image", id="vision"):
                vision_tab = build_vision_tab(services.vision, settings.vision.default_question)
            with gr.Tab("Text to image", id="image"):
                image_tab = build_image_tab(services.images, settings.image)
            with gr.Tab("Models", id="models") as models_page:
                models_tab = build_models_tab()
        with gr.Accordion("Models in memory", open=True):
            status = gr.Markdown(elem_id="model-status")

        def refresh_status() -> tuple[Any, str]:
            try:
                text = services.chat.resolve_model().notice
            except AppError as error:
                text = str(error)
            banner = gr.update(value=f"⚠️ {text}" if text else "", visible=bool(text))
            return banner, format_status(services.manager.status())

        def refresh_offers() -> list[Any]:
            """What the tabs offer follows what is installed (a model placed or picked meanwhile)."""
            vision_text = vision_notice(services.vision)
            image_missing = services.images.availability()
            return [
                commands_hint(services.images, services.vision.availability()),
                gr.update(value=vision_text, visible=bool(vision_text)),
                gr.update(**ask_button(services.vision)),
                gr.update(value=f"⚠️ {image_missing}" if image_missing else "", visible=bool(image_missing)),
                gr.update(**generate_button(services.images)),
                gr.update(**lora_choices(services.images)),
                gr.update(**microphone_offer(services.transcriber)),
                gr.update(**speak_offer(services.speaker)),
            ]

        offers = [
            chat_tab.commands,
            vision_tab.notice,
            vision_tab.ask,
            image_tab.notice,
            image_tab.generate,
            image_tab.lora,
            voice.microphone,
            voice.speak_replies,
        ]
        models_view_outputs = [
            models_tab.table,
            models_tab.missing,
            models_tab.chat_model,
            models_tab.image_model,
            models_tab.loaded,
        ]
        private: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden"}

        def after(event: Any) -> None:
            event.then(refresh_status, None, [notice, status], **private)

        def start_session(stored_id: str) -> tuple[str, str]:
            """The owner of this browser's conversations, and the id the browser keeps."""
            if not per_browser:
                return stored_id, SHARED_OWNER
            browser = stored_id if len(stored_id) == 32 else new_browser_id()
            return browser, browser

        saver = Saver(store, (Path(get_upload_folder()), settings.image.outputs_dir, store.files_dir))
        handlers = ChatHandlers(assistant, services.chat, saver, {})
        chat_events = wire_chat_tab(chat_tab, handlers, conversation, owner, after)
        voice_handlers = VoiceHandlers(services.transcriber, services.speaker, handlers)
        chat_events += wire_voice_controls(voice, chat_tab, voice_handlers, conversation, owner, chat_events, after)
        for event in chat_events:
            refresh_listing_after(event, panel, store, conversation, owner)
        wire_conversations_panel(panel, store, exports_dir, chat_tab.chatbot, conversation, owner)
        wire_vision_tab(vision_tab, services.vision, settings.vision.default_question, after)
        wire_image_tab(image_tab, services.images, after)
        for event in wire_models_tab(models_tab, services):
            event.then(refresh_offers, None, offers, **private).then(refresh_status, None, [notice, status], **private)
        models_page.select(lambda: models_view(services), None, models_view_outputs, **private)
        gr.Timer(2.0).tick(refresh_status, None, [notice, status], **private)
        # On a phone the open sidebar would cover the chat: it starts closed there (its button opens it).
        demo.load(None, None, None, js=CLOSE_SIDEBAR_ON_PHONES, **private)
        loaded = demo.load(start_session, browser_id, [browser_id, owner], **private)
        loaded.then(refresh_status, None, [notice, status], **private).then(
            refresh_offers, None, offers, **private
        ).then(lambda: models_view(services), None, models_view_outputs, **private)
        loaded.then(lambda owner_id: listing_update(store, owner_id, "", ""), owner, panel.listing, **private)
    demo.queue(default_concurrency_limit=1)
    return demo
