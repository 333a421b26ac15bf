"""Helpers every tab shares: chat history conversion, streaming into a chatbot,
turning errors into messages, and the status panel's text."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from errors import AppError
from model_manager import ManagerStatus
from text_generation.stream import Message, TextStream

log = logging.getLogger(__name__)
MIB = 2**20
# Requests from the UI that may wait for their model at once. The model manager queues them fairly, and
# Stop reaches a request there; Gradio's own queue would hold them where Stop cannot.
MODEL_EVENT_CONCURRENCY = 8
History = list[dict[str, Any]]


def text_of(content: Any) -> str:
    """Chatbot content arrives as a string or a list of typed parts; keep the text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


# Messages the UI adds for the user only (errors, hints) carry one of these in metadata["log"]:
# Gradio keeps that field on the way back from the browser and shows it only on titled notes.
ERROR_MARK = "error"
HINT_MARK = "hint"
STOPPED_MARK = "*(stopped)*"


def for_user_only(message: dict[str, Any]) -> bool:
    """Route notes (a title), errors and hints are shown, never sent to a model."""
    metadata = message.get("metadata") or {}
    return bool(metadata.get("title")) or metadata.get("log") in (ERROR_MARK, HINT_MARK)


def plain_history(history: History | None) -> list[Message]:
    """The text turns of a chatbot's history: route notes, errors, hints and pictures are
    shown to the user, not sent to a model."""
    turns: list[Message] = []
    for message in history or []:
        text = text_of(message.get("content"))
        if message.get("role") in ("user", "assistant") and text and not for_user_only(message):
            if message["role"] == "assistant" and text.endswith(STOPPED_MARK):
                text = text.removesuffix(STOPPED_MARK).rstrip()
            turns.append({"role": message["role"], "content": text})
    return turns


@contextlib.contextmanager
def session_switch(switches: dict[str, threading.Event], request: gr.Request) -> Iterator[threading.Event]:
    """The browser session's Stop switch while its work runs (Stop sets it); removed when the work ends."""
    session = request.session_hash or ""
    switch = switches[session] = threading.Event()
    try:
        yield switch
    finally:
        if switches.get(session) is switch:
            del switches[session]


def sentence(text: str) -> str:
    """Messages shown as they are start with a capital."""
    return text[:1].upper() + text[1:]


def user_message(error: Exception) -> str:
    """Typed errors carry a message for the user; anything else is a bug: log it, say so."""
    if isinstance(error, AppError):
        return sentence(str(error))
    log.error("unexpected error in the UI", exc_info=error)
    return f"Unexpected error ({type(error).__name__}: {error}). The app keeps running; the log has details."


def error_bubble(error: Exception | str) -> dict[str, Any]:
    """A failed turn's message, shown in the conversation where the answer would have been."""
    text = error if isinstance(error, str) else user_message(error)
    return {"role": "assistant", "content": f"⚠️ {text}", "metadata": {"log": ERROR_MARK}}


def hint_bubble(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": f"Tip: {text}", "metadata": {"log": HINT_MARK}}


def without_errors(history: History | None) -> History:
    """The conversation without earlier error messages: they are gone once the user tries again."""
    return [m for m in history or [] if (m.get("metadata") or {}).get("log") != ERROR_MARK]


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
        shown[-1]["content"] = f"{shown[-1]['content'].rstrip()} {STOPPED_MARK}".lstrip()
        yield shown


def stream_reply(
    stream: TextStream, earlier: History, question: str, shown_question: str | None = None
) -> Iterator[tuple[Any, History]]:
    """Yield (input box, chatbot) updates while ``stream`` answers ``question``.

    On an error the question goes back into the input box and the conversation shows the
    message where the answer would have been, so nothing the user typed is lost.
    """
    shown: History = [*earlier, {"role": "user", "content": shown_question or question}]
    yield "", shown
    try:
        for chatbot in stream_into(stream, shown):
            yield gr.skip(), chatbot
    except Exception as error:
        yield question, [*earlier, error_bubble(error)]


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
    if status.parked:
        parked = ", ".join(f"{m.label} ({format_size(m.size_bytes)})" for m in status.parked)
        used = sum(m.size_bytes for m in status.parked)
        lines += [
            "",
            f"**Parked in RAM** (back in a copy, not a load; {format_size(used)} of "
            f"{format_size(status.warm_tier_budget_bytes)}): {parked}",
        ]
    if status.history:
        last = status.history[-1]
        when = time.strftime("%H:%M:%S", time.localtime(last.at))
        lines += ["", f"Last: {last.action} {last.label} in {last.seconds:.2f} s at {when}"]
    return "\n".join(lines)
