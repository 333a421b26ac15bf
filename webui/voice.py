"""Voice in the Chat tab: a spoken message is transcribed and sent through the assistant like a
typed one (so a spoken "draw …" draws), and with *Speak replies* on, each answer is spoken
sentence by sentence as it is synthesised."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from speech_to_text import TranscriptionService
from text_to_speech import SpeechService
from webui.chat_tab import STOPPED_MARK, ChatHandlers, ChatTab, Update, last_reply_index
from webui.common import MODEL_EVENT_CONCURRENCY, History, error_bubble, text_of, without_errors

MARKDOWN_MARKS = re.compile(r"[*_`#>|~]+")


@dataclass(frozen=True)
class VoiceControls:
    microphone: gr.Audio
    speak_replies: gr.Checkbox
    reply_audio: gr.Audio


def microphone_offer(transcriber: TranscriptionService) -> dict[str, Any]:
    missing = transcriber.availability()
    label = "Speak a message" if not missing else "Speaking needs a speech-to-text model (see the Models tab)"
    return {"label": label, "interactive": not missing}


def speak_offer(speaker: SpeechService) -> dict[str, Any]:
    missing = speaker.availability()
    label = "Speak replies" if not missing else "Speak replies (no voice: see the Models tab)"
    return {"label": label, "interactive": not missing}


def build_voice_controls(transcriber: TranscriptionService, speaker: SpeechService) -> VoiceControls:
    with gr.Row(elem_id="chat-voice-row", equal_height=True):
        microphone = gr.Audio(
            sources=["microphone", "upload"],
            type="filepath",
            scale=3,
            elem_id="chat-microphone",
            **microphone_offer(transcriber),
        )
        speak_replies = gr.Checkbox(value=False, scale=1, elem_id="chat-speak-replies", **speak_offer(speaker))
        reply_audio = gr.Audio(
            label="Spoken reply",
            streaming=True,
            autoplay=True,
            interactive=False,
            scale=3,
            elem_id="chat-reply-audio",
        )
    return VoiceControls(microphone, speak_replies, reply_audio)


def spoken_text(markdown: str) -> str:
    """A reply as it should sound: no Markdown marks, no stop or length marks."""
    text = markdown.removesuffix(STOPPED_MARK).rstrip().removesuffix("…")
    return MARKDOWN_MARKS.sub(" ", text).strip()


@dataclass(frozen=True)
class VoiceHandlers:
    transcriber: TranscriptionService
    speaker: SpeechService
    chat: ChatHandlers

    def voice_turn(
        self,
        recording: str | None,
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
        """Transcribe the recording, then answer its words as if they had been typed."""
        if not recording:
            yield gr.skip(), history, conversation
            return
        try:
            transcript = self.transcriber.transcribe(
                Path(recording), progress=lambda done, total: progress((done, total), desc="Listening", unit="s")
            )
        except Exception as error:  # silence, an unreadable file: said in the conversation
            yield gr.skip(), [*without_errors(history), error_bubble(error)], conversation
            return
        settings = (system_prompt, temperature, top_p, max_tokens, repeat_penalty, seed, conversation, owner)
        yield from self.chat.respond({"text": transcript.text, "files": []}, history, *settings, request, progress)

    def speak_reply(self, history: History, enabled: bool) -> Iterator[Any]:
        """The newest answer, spoken sentence by sentence while the rest is synthesised."""
        index = last_reply_index(history or [])
        if not enabled or index is None:
            return
        text = spoken_text(text_of(history[index].get("content")))[: self.speaker.max_chars]
        if not text:
            return
        stream = self.speaker.speak(text)
        for chunk in stream:
            yield stream.sample_rate, np.frombuffer(chunk, dtype=np.int16)


def wire_voice_controls(
    voice: VoiceControls,
    tab: ChatTab,
    handlers: VoiceHandlers,
    conversation: gr.State,
    owner: gr.State,
    chat_events: list[Any],
    after: Callable[[Any], None],
) -> list[Any]:
    """Returns the events that change the conversation (for saving and refreshing the list)."""
    inputs = [voice.microphone, tab.chatbot, tab.system_prompt, *tab.sampling, conversation, owner]
    outputs = [tab.message, tab.chatbot, conversation]
    private: dict[str, Any] = {"api_visibility": "private", "concurrency_limit": MODEL_EVENT_CONCURRENCY}
    events = [
        voice.microphone.stop_recording(handlers.voice_turn, inputs, outputs, **private),
        voice.microphone.upload(handlers.voice_turn, inputs, outputs, **private),
    ]
    for event in events:
        after(event)
        event.then(lambda: None, None, voice.microphone, api_visibility="private", show_progress="hidden")
    for event in [*chat_events, *events]:
        event.then(
            handlers.speak_reply,
            [tab.chatbot, voice.speak_replies],
            voice.reply_audio,
            api_visibility="private",
            show_progress="hidden",
        )
    return events
