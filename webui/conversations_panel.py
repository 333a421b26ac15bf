"""Saved conversations: the sidebar list (search, reopen, rename, delete, export) and the
saving of each Chat tab turn.

Conversations belong to an owner: one shared owner on a server without an API key (one
person's machine), else one per browser (a random id kept in the browser's storage). That
keeps people who share a key apart in the list; it is not a user account system.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from conversations.store import ConversationStore
from errors import AppError
from webui.common import user_message
from webui.history import from_stored, to_stored

log = logging.getLogger(__name__)
SHARED_OWNER = "local"


def within(path: str, roots: tuple[Path, ...]) -> bool:
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


@dataclass(frozen=True)
class Saver:
    """Saves a conversation as it stands; a failure to save never costs the user the reply on screen.

    Only images from ``image_roots`` are kept (Gradio's upload folder, the generated images, the
    store's own files): a path in a crafted history must not copy a server file into the store."""

    store: ConversationStore
    image_roots: tuple[Path, ...]

    def save(self, owner: str, conversation: str, history: list[dict[str, Any]]) -> str:
        """Returns the conversation's id (a new one for a first turn)."""
        messages = [
            m if not isinstance(m["content"], dict) or within(m["content"]["path"], self.image_roots)
            else {**m, "content": "(image not kept)"}
            for m in to_stored(history)
        ]  # fmt: skip
        try:
            if not conversation:
                conversation = self.store.create(owner)
            self.store.save(owner, conversation, messages)
        except (AppError, OSError, sqlite3.Error) as error:
            log.warning("could not save conversation %s: %s", conversation or "(new)", error)
        return conversation


@dataclass(frozen=True)
class ConversationsPanel:
    new: gr.Button
    search: gr.Textbox
    listing: gr.Radio
    title: gr.Textbox
    rename: gr.Button
    export: gr.Button
    delete: gr.Button
    confirm_delete: gr.Button
    exported: gr.File
    message: gr.Markdown


def build_conversations_panel() -> ConversationsPanel:
    """Inside a sidebar: the list first, what to do with the open conversation below it."""
    new = gr.Button("+ New conversation", variant="primary", elem_id="conversation-new")
    search = gr.Textbox(placeholder="Search conversations", show_label=False, elem_id="conversation-search")
    listing = gr.Radio(choices=[], label="Conversations", elem_id="conversation-list")
    with gr.Accordion("This conversation", open=False, elem_id="conversation-actions"):
        title = gr.Textbox(label="Title", elem_id="conversation-title")
        with gr.Row():
            rename = gr.Button("Rename", size="sm", elem_id="conversation-rename")
            export = gr.Button("Export", size="sm", elem_id="conversation-export")
            delete = gr.Button("Delete", size="sm", variant="stop", elem_id="conversation-delete")
        confirm_delete = gr.Button(
            "Delete for good", size="sm", variant="stop", visible=False, elem_id="conversation-confirm-delete"
        )
        exported = gr.File(label="Export (Markdown and JSON)", file_count="multiple", visible=False)
    message = gr.Markdown(elem_id="conversation-message")
    return ConversationsPanel(new, search, listing, title, rename, export, delete, confirm_delete, exported, message)


def listing_update(store: ConversationStore, owner: str, query: str, selected: str) -> Any:
    try:
        found = store.list(owner, query or "")
    except AppError as error:
        return gr.update(choices=[], value=None, label=user_message(error))
    choices = [(f"{c.title} · {time.strftime('%d %b %H:%M', time.localtime(c.updated_at))}", c.id) for c in found]
    label = f"Conversations ({len(found)})" if not query else f"Conversations matching “{query.strip()}” ({len(found)})"
    value = selected if any(c.id == selected for c in found) else None
    return gr.update(choices=choices, value=value, label=label)


def wire_conversations_panel(
    panel: ConversationsPanel,
    store: ConversationStore,
    exports_dir: Path,
    chatbot: gr.Chatbot,
    conversation: gr.State,
    owner: gr.State,
) -> None:
    def refresh(owner_id: str, query: str, selected: str) -> Any:
        return listing_update(store, owner_id, query, selected)

    def open_conversation(owner_id: str, chosen: str | None) -> tuple[Any, Any, Any, str]:
        if not chosen:
            return gr.skip(), gr.skip(), gr.skip(), ""
        try:
            found = store.get(owner_id, chosen)
        except AppError as error:
            return gr.skip(), gr.skip(), gr.skip(), f"⚠️ {user_message(error)}"
        return from_stored(found.messages), found.id, found.title, ""

    def start_new() -> tuple[list[Any], str, str, Any, str]:
        return [], "", "", gr.update(value=None), ""

    def rename(owner_id: str, chosen: str, title: str) -> str:
        if not chosen:
            return "⚠️ Open or start a conversation first; then rename it."
        try:
            store.rename(owner_id, chosen, title)
        except AppError as error:
            return f"⚠️ {user_message(error)}"
        return "Renamed."

    def delete(owner_id: str, chosen: str) -> tuple[Any, Any, Any, Any, str]:
        if not chosen:
            return gr.skip(), gr.skip(), gr.skip(), gr.update(visible=False), "⚠️ There is no saved conversation open."
        try:
            store.delete(owner_id, chosen)
        except AppError as error:
            return gr.skip(), gr.skip(), gr.skip(), gr.update(visible=False), f"⚠️ {user_message(error)}"
        return [], "", "", gr.update(visible=False), "Deleted."

    def export(owner_id: str, chosen: str) -> tuple[Any, str]:
        if not chosen:
            return gr.update(visible=False), "⚠️ Open or start a conversation first; then export it."
        try:
            folder = exports_dir / uuid.uuid4().hex
            folder.mkdir(parents=True)
            markdown, json_file = folder / f"conversation-{chosen[:8]}.md", folder / f"conversation-{chosen[:8]}.json"
            markdown.write_text(store.export_markdown(owner_id, chosen), encoding="utf-8")
            json_file.write_text(store.export_json(owner_id, chosen), encoding="utf-8")
        except (AppError, OSError) as error:
            return gr.update(visible=False), f"⚠️ {user_message(error)}"
        return gr.update(value=[str(markdown), str(json_file)], visible=True), ""

    private: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden"}
    listing_inputs = [owner, panel.search, conversation]
    panel.search.change(refresh, listing_inputs, panel.listing, **private)
    opened = panel.listing.input(
        open_conversation, [owner, panel.listing], [chatbot, conversation, panel.title, panel.message], **private
    )
    opened.then(lambda: gr.update(visible=False), None, panel.exported, **private)
    panel.new.click(start_new, None, [chatbot, conversation, panel.title, panel.listing, panel.message], **private)
    panel.rename.click(rename, [owner, conversation, panel.title], panel.message, **private).then(
        refresh, listing_inputs, panel.listing, **private
    )
    panel.delete.click(lambda: gr.update(visible=True), None, panel.confirm_delete, **private)
    panel.confirm_delete.click(
        delete,
        [owner, conversation],
        [chatbot, conversation, panel.title, panel.confirm_delete, panel.message],
        **private,
    ).then(refresh, listing_inputs, panel.listing, **private)
    panel.export.click(export, [owner, conversation], [panel.exported, panel.message], **private)


def refresh_listing_after(
    event: Any, panel: ConversationsPanel, store: ConversationStore, conversation: gr.State, owner: gr.State
) -> None:
    """After a turn: the list shows the conversation (a first turn creates it) with its title."""

    def refresh(owner_id: str, query: str, selected: str) -> tuple[Any, Any]:
        title = gr.skip()
        # A conversation deleted meanwhile keeps its title field; the list shows it is gone.
        with contextlib.suppress(AppError):
            title = store.get(owner_id, selected).title if selected else title
        return listing_update(store, owner_id, query, selected), title

    event.then(
        refresh,
        [owner, panel.search, conversation],
        [panel.listing, panel.title],
        api_visibility="private",
        show_progress="hidden",
    )


def new_browser_id() -> str:
    return uuid.uuid4().hex
