"""Helpers every tab shares: chat history conversion, streaming into a chatbot,
turning errors into messages, and the status panel's text."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from errors import AppError
from model_manager import ManagerStatus
from text_generation.stream import Message, TextStream

log = logging.getLogger(__name__)
MIB = 2**20
History = list[dict[str, Any]]


def text_of(content: Any) -> str:
    """Chatbot content arrives as a string or a list of typed parts; keep the text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def plain_history(history: History | None) -> list[Message]:
    """The text turns of a chatbot's history: route notes (messages with a title) and
    pictures are shown to the user, not sent to a model."""
    turns: list[Message] = []
    for message in history or []:
        text = text_of(message.get("content"))
        if message.get("role") in ("user", "assistant") and text and not (message.get("metadata") or {}).get("title"):
            turns.append({"role": message["role"], "content": text})
    return turns


def as_gradio_error(error: Exception) -> gr.Error:
    """Typed errors carry a message for the user; anything else is a bug: log it, say so."""
    if isinstance(error, AppError):
        return gr.Error(str(error))
    log.error("unexpected error in the UI", exc_info=error)
    return gr.Error(f"Unexpected error ({type(error).__name__}: {error}). The app keeps running; the log has details.")


def stream_into(stream: TextStream, shown: History) -> Iterator[History]:
    """Append an assistant message to ``shown`` and fill it as ``stream`` produces text."""
    shown = [*shown, {"role": "assistant", "content": ""}]
    try:
        for piece in stream:
            shown[-1]["content"] += piece
            yield shown
    finally:
        stream.close()
    if stream.finish_reason == "length":
        shown[-1]["content"] += " …"
        yield shown
    elif stream.finish_reason == "cancelled":
        shown[-1]["content"] += " *(stopped)*"
        yield shown


def stream_reply(
    stream: TextStream, earlier: list[Message], question: str, shown_question: str | None = None
) -> Iterator[tuple[Any, History]]:
    """Yield (input box, chatbot) updates while ``stream`` answers ``question``.

    On an error the question goes back into the input box and the chatbot returns to
    ``earlier``, so nothing the user typed is lost.
    """
    shown: History = [*earlier, {"role": "user", "content": shown_question or question}]
    yield "", shown
    try:
        for chatbot in stream_into(stream, shown):
            yield gr.skip(), chatbot
    except Exception as error:
        yield question, earlier
        raise as_gradio_error(error) from None


def format_size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / MIB:.0f} MiB"


def format_status(status: ManagerStatus) -> str:
    budgets = " · ".join(
        f"**{d.name}:** {format_size(d.resident_bytes)} of {format_size(d.budget_bytes)}" for d in status.devices
    )
    waiting = f" · **Waiting:** {status.waiting}" if status.waiting else ""
    lines = [f"**Policy:** {status.policy} · {budgets}{waiting}", ""]
    if status.resident:
        lines += ["| Model | Device | State | In use | Memory | Load time | Idle |", "|---|---|---|---|---|---|---|"]
        for m in status.resident:
            lines.append(
                f"| {m.label} | {m.device} | {m.state} | {'yes' if m.in_use else 'no'} | {format_size(m.size_bytes)} | "
                f"{m.load_seconds:.2f} s | {m.idle_seconds:.0f} s |"
            )
    else:
        lines.append("No model is loaded; the next request loads one.")
    if status.history:
        last = status.history[-1]
        when = time.strftime("%H:%M:%S", time.localtime(last.at))
        lines += ["", f"Last: {last.action} {last.label} in {last.seconds:.2f} s at {when}"]
    return "\n".join(lines)
