"""A chatbot's history as the conversation store keeps it, and back.

The browser sends messages in Gradio's normalised shape (a list of typed parts per message);
handlers build plain dicts. The store takes one shape: text, or one image, per message.
"""

from __future__ import annotations

from typing import Any

from webui.common import History

KEPT_METADATA = ("title", "log", "status")


def _parts(content: Any) -> list[str | dict[str, Any]]:
    """A message's content as a list of text strings and image references."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, dict):
        return _parts([content])
    parts: list[str | dict[str, Any]] = []
    for part in content or []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        elif part.get("type") == "file" and isinstance(part.get("file"), dict):
            parts.append({"path": str(part["file"].get("path", "")), "alt_text": part.get("alt_text")})
        elif "path" in part:
            parts.append({"path": str(part["path"]), "alt_text": part.get("alt_text")})
    return parts


def to_stored(history: History | None) -> list[dict[str, Any]]:
    stored: list[dict[str, Any]] = []
    for message in history or []:
        role = message.get("role")
        if role not in ("user", "assistant"):
            continue
        metadata = {k: v for k, v in (message.get("metadata") or {}).items() if k in KEPT_METADATA and v}
        for part in _parts(message.get("content")):
            entry: dict[str, Any] = {"role": role, "content": part}
            if metadata:
                entry["metadata"] = metadata
            stored.append(entry)
    return stored


def from_stored(messages: list[dict[str, Any]]) -> History:
    """Stored messages as a chatbot value (Gradio copies the kept images into its cache to show them)."""
    return [dict(message) for message in messages]


def conversation_image(history: History | None) -> str | None:
    """The picture the conversation is about: the last one the user attached."""
    for message in reversed(history or []):
        if message.get("role") != "user":
            continue
        for part in reversed(_parts(message.get("content"))):
            if isinstance(part, dict) and part.get("path"):
                return str(part["path"])
    return None
