"""The Models tab: every model the app knows, whether it is here, loaded, the default;
what the model manager measured of it; where to put a missing one and how to get it.
Pickers choose the chat model and the image checkpoint for the next requests, and a
loaded model can be unloaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from errors import AppError
from services import InventoryRow, Services
from webui.common import format_size, user_message

KIND_NAMES = {
    "chat": "Chat",
    "vision": "Vision",
    "image": "Image",
    "lora": "LoRA",
    "transcription": "Speech to text",
    "speech": "Voice",
}


@dataclass(frozen=True)
class ModelsTab:
    table: gr.Markdown
    missing: gr.Markdown
    chat_model: gr.Dropdown
    image_model: gr.Dropdown
    loaded: gr.Dropdown
    unload: gr.Button
    refresh: gr.Button
    message: gr.Markdown


def state_of(row: InventoryRow) -> str:
    if row.loaded is not None:
        use = ", in use" if row.loaded.in_use else ""
        return f"🟢 loaded ({row.loaded.device}{use})"
    return "✅ present" if row.present else "❌ missing"


def measured(row: InventoryRow) -> str:
    """Load time and memory as the manager measured them, or a dash before the first load."""
    if row.loaded is not None:
        return f"{row.loaded.load_seconds:.1f} s · {format_size(row.loaded.size_bytes)}"
    if row.last_load is not None:
        return f"{row.last_load.seconds:.1f} s · {format_size(row.last_load.bytes)}"
    return "–"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def inventory_table(rows: list[InventoryRow]) -> str:
    lines = [
        "| Kind | Model | State | Default | On disk | Last load | Where |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        size = format_size(row.size_bytes) if row.size_bytes is not None else "–"
        default = "★" if row.selected and row.kind != "lora" else ""
        lines.append(
            f"| {KIND_NAMES[row.kind]} | {cell(row.name)} | {state_of(row)} | {default} | {size} | {measured(row)} "
            f"| `{cell(str(row.path))}` |"
        )
    if not any(row.kind == "lora" for row in rows):
        lines.append("| LoRA | none | – | | – | – | |")
    return "\n".join(lines)


def missing_list(rows: list[InventoryRow], lora_hint: str | None) -> str:
    """Each missing model with where it goes and the command that prepares it."""
    missing = [row for row in rows if not row.present]
    lines = []
    if missing:
        lines.append("**Missing — how to get them** (nothing is downloaded by the app itself)")
        lines += [f"- **{KIND_NAMES[row.kind]} · {row.name}** — {row.how_to_get}" for row in missing]
    if lora_hint:
        lines.append(f"- **LoRAs** — {lora_hint}")
    return "\n".join(lines) if lines else "Every configured model is in place."


def build_models_tab() -> ModelsTab:
    gr.Markdown(
        "Every model the app knows. A missing one is listed below with the folder to place it in and the "
        "command that prepares it on a connected machine. The pickers choose the model for the next request; "
        "the model manager swaps it in then.",
        elem_classes=["hint"],
    )
    with gr.Row():
        chat_model = gr.Dropdown(label="Chat model (GGUF files in the models folder)", elem_id="models-chat-picker")
        image_model = gr.Dropdown(label="Image checkpoint (folders and .safetensors)", elem_id="models-image-picker")
    with gr.Row(equal_height=True):
        loaded = gr.Dropdown(label="Loaded models", scale=3, elem_id="models-loaded")
        unload = gr.Button("Unload", scale=1, elem_id="models-unload")
        refresh = gr.Button("Refresh", scale=1, elem_id="models-refresh")
    message = gr.Markdown(elem_id="models-message")
    table = gr.Markdown(elem_id="models-table", elem_classes=["wide-table"])
    missing = gr.Markdown(elem_id="models-missing")
    return ModelsTab(table, missing, chat_model, image_model, loaded, unload, refresh, message)


def models_view(services: Services) -> list[Any]:
    """Updates for the table, the missing list, both pickers and the loaded list."""
    rows = services.inventory()
    chat_names = [row.name for row in rows if row.kind == "chat" and row.present]
    image_names = [row.name for row in rows if row.kind == "image" and row.present]
    lora_hint = None
    if not any(row.kind == "lora" for row in rows):
        lora_hint = f"none yet: place kohya or diffusers .safetensors files in {services.images.lora_dir}."
    loaded = [m.label for m in services.manager.status().resident]
    return [
        inventory_table(rows),
        missing_list(rows, lora_hint),
        gr.update(choices=chat_names, value=services.chat.selected_name if chat_names else None),
        gr.update(choices=image_names, value=services.images.selected_name if image_names else None),
        gr.update(choices=loaded, value=loaded[0] if loaded else None),
    ]


def wire_models_tab(tab: ModelsTab, services: Services) -> list[Any]:
    """Connect the tab's events; returns the events after which other tabs should refresh."""
    view = [tab.table, tab.missing, tab.chat_model, tab.image_model, tab.loaded]
    private: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden"}

    def picker(service: Any, says: str) -> Callable[[str | None], str]:
        def pick(name: str | None) -> str:
            if not name or name == service.selected_name:
                return ""
            try:
                service.select_model(name)
            except AppError as error:
                return f"⚠️ {user_message(error)}"
            return says.format(name=name)

        return pick

    pick_chat = picker(services.chat, "The next chat request uses **{name}**; the model manager loads it then.")
    pick_image = picker(services.images, "The next picture is drawn with **{name}**; the model manager loads it then.")

    def unload(label: str | None) -> str:
        if not label:
            return "No model is loaded."
        if services.manager.unload(label):
            return f"Unloaded {label}."
        return f"⚠️ {label} is in use (or already gone); it can be unloaded when its request ends."

    picked_chat = tab.chat_model.input(pick_chat, tab.chat_model, tab.message, **private)
    picked_image = tab.image_model.input(pick_image, tab.image_model, tab.message, **private)
    unloaded = tab.unload.click(unload, tab.loaded, tab.message, **private)
    refreshed = tab.refresh.click(lambda: models_view(services), None, view, **private)
    for event in (picked_chat, picked_image, unloaded):
        event.then(lambda: models_view(services), None, view, **private)
    return [picked_chat, picked_image, unloaded, refreshed]
