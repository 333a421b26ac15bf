"""Voice in the Chat tab: a spoken message is transcribed and sent through the assistant like a
typed one (so a spoken "draw …" draws), and with *Speak replies* on, each answer is spoken
sentence by sentence as it is synthesised."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from media.audio import WHISPER_RATE, DecodedAudio, resample_pcm
from speech_to_text import TranscriptionService, speech_segments
from text_to_speech import SpeechService
from webui.chat_tab import STOPPED_MARK, ChatHandlers, ChatTab, Update, last_reply_index
from webui.common import MODEL_EVENT_CONCURRENCY, History, error_bubble, session_switch, text_of, without_errors

MARKDOWN_MARKS = re.compile(r"[*_`#>|~]+")
LISTEN_EVERY_S = 0.5  # the hands-free microphone's pieces
TURN_SILENCE_MS = 800  # a pause this long ends a hands-free turn
PRE_ROLL_SECONDS = 0.5  # kept from before speech starts
MAX_TURN_SECONDS = 60
# The browser drops what the microphone hears before the server has taken the stream, so the user is
# told when it has: words said before "Listening" are not heard.
NOT_LISTENING = "Press *Record* and start speaking when this says **Listening**."
LISTENING = "🎙️ **Listening**: speak now. A pause ends your turn."
HEARING = "🎙️ **Hearing you** …"


def as_pcm16(samples: np.ndarray) -> bytes:
    """A browser's microphone piece (int16 or float, mono or stereo) as 16-bit mono PCM."""
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    if np.issubdtype(mono.dtype, np.floating):
        mono = np.clip(mono, -1, 1) * 32767
    return np.asarray(mono).astype(np.int16).tobytes()


@dataclass(frozen=True)
class VoiceControls:
    microphone: gr.Audio
    speak_replies: gr.Checkbox
    reply_audio: gr.Audio
    hands_free: gr.Audio  # streams the microphone while it records
    hands_free_status: gr.Markdown  # says when the stream is live, so the first words are not lost
    listening: gr.State  # this session's Listening
    turns: gr.Number  # counts finished utterances: its change starts a turn


@dataclass
class Listening:
    """What the hands-free microphone heard since the last turn ended (server-side, per session)."""

    pcm: bytearray = field(default_factory=bytearray)  # 16-bit mono at the browser's rate
    rate: int = 0
    speaking: bool = False
    utterance: DecodedAudio | None = None  # the last finished turn, waiting to be answered
    turns: int = 0
    live: bool = False  # the server has taken this recording's stream

    def heard(self) -> DecodedAudio:
        """Everything so far at 16 kHz (resampled as one piece: no seams every 100 ms)."""
        samples = np.frombuffer(resample_pcm(bytes(self.pcm), self.rate, WHISPER_RATE), dtype=np.int16)
        audio = samples.astype(np.float32) / 32768.0
        return DecodedAudio(audio, audio.size / WHISPER_RATE, False)

    def keep_last(self, seconds: float) -> None:
        keep = int(seconds * self.rate) * 2
        if len(self.pcm) > keep:
            del self.pcm[: len(self.pcm) - keep]


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
    with gr.Accordion("Hands-free voice mode", open=False, elem_id="chat-hands-free-panel"):
        gr.Markdown(
            "Record here once and talk: a pause ends each turn, the answer is spoken (turn on *Speak replies*), "
            "and talking over it stops it. Stop recording to leave the mode.",
            elem_classes=["hint"],
        )
        hands_free_status = gr.Markdown(NOT_LISTENING, elem_id="chat-hands-free-status")
        hands_free = gr.Audio(
            sources=["microphone"],
            streaming=True,
            type="numpy",
            label="Hands-free microphone",
            elem_id="chat-hands-free",
            **{k: v for k, v in microphone_offer(transcriber).items() if k == "interactive"},
        )
    listening = gr.State(Listening())
    turns = gr.Number(0, visible=False)
    return VoiceControls(microphone, speak_replies, reply_audio, hands_free, hands_free_status, listening, turns)


def spoken_text(markdown: str) -> str:
    """A reply as it should sound: no Markdown marks, no stop or length marks."""
    text = markdown.removesuffix(STOPPED_MARK).rstrip().removesuffix("…")
    return MARKDOWN_MARKS.sub(" ", text).strip()


@dataclass(frozen=True)
class VoiceHandlers:
    transcriber: TranscriptionService
    speaker: SpeechService
    chat: ChatHandlers
    speaking: dict[str, threading.Event] = field(default_factory=dict)  # a session's reply being spoken

    def listen(self, chunk: Any, listening: Listening, request: gr.Request) -> tuple[Listening, Any, Any, Any]:
        """One piece of the hands-free stream: find where speech starts (barge-in) and ends (a turn).

        Returns the session's state, the turn counter, the reply player and the status line."""
        if chunk is None:
            return listening, gr.skip(), gr.skip(), gr.skip()
        rate, samples = chunk
        status: Any = gr.skip()
        if rate != listening.rate or not listening.live:  # a new recording: start over
            listening.pcm, listening.rate, listening.speaking, listening.live = bytearray(), int(rate), False, True
            status = LISTENING
        listening.pcm += as_pcm16(samples)
        heard = listening.heard()
        segments = speech_segments(heard, {"silence_duration_ms": TURN_SILENCE_MS})
        if not segments:  # keep a little before speech starts, not minutes of silence
            listening.keep_last(PRE_ROLL_SECONDS)
            return listening, gr.skip(), gr.skip(), status
        stop_playback: Any = gr.skip()
        if not listening.speaking:
            listening.speaking = True
            stop_playback = self.barge_in(request.session_hash or "")
            status = HEARING
        silence = (heard.samples.size - segments[-1]["end"]) / WHISPER_RATE
        too_long = heard.samples.size > MAX_TURN_SECONDS * WHISPER_RATE
        if silence * 1000 < TURN_SILENCE_MS and not too_long:
            return listening, gr.skip(), stop_playback, status
        spoken = heard.samples[max(0, segments[0]["start"] - int(PRE_ROLL_SECONDS * WHISPER_RATE)) :]
        listening.utterance = DecodedAudio(spoken, spoken.size / WHISPER_RATE, False)
        listening.pcm, listening.speaking = bytearray(), False
        listening.turns += 1
        return listening, listening.turns, stop_playback, LISTENING

    @staticmethod
    def stop_listening(listening: Listening) -> tuple[Listening, str]:
        """Recording stopped: the next Record starts a fresh stream (and a fresh status)."""
        listening.live, listening.speaking, listening.pcm = False, False, bytearray()
        return listening, NOT_LISTENING

    def barge_in(self, session: str) -> Any:
        """The user talks over an answer: stop writing it and stop speaking it."""
        interrupted = False
        for switches in (self.chat.running, self.speaking):
            switch = switches.get(session)
            if switch is not None:
                switch.set()
                interrupted = True
        return gr.update(value=None) if interrupted else gr.skip()

    def hands_free_turn(
        self,
        listening: Listening,
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
        progress: gr.Progress = gr.Progress(),  # noqa: B008
    ) -> Iterator[Update]:
        utterance, listening.utterance = listening.utterance, None
        settings = (history, system_prompt, temperature, top_p, max_tokens, repeat_penalty, seed, conversation, owner)
        yield from self.voice_turn(utterance, *settings, request, progress)

    def voice_turn(
        self,
        recording: str | DecodedAudio | None,
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
        if recording is None or recording == "":
            yield gr.skip(), history, conversation
            return
        audio = recording if isinstance(recording, DecodedAudio) else Path(recording)
        try:
            transcript = self.transcriber.transcribe(
                audio, progress=lambda done, total: progress((done, total), desc="Listening", unit="s")
            )
        except Exception as error:  # silence, an unreadable file: said in the conversation
            yield gr.skip(), [*without_errors(history), error_bubble(error)], conversation
            return
        settings = (system_prompt, temperature, top_p, max_tokens, repeat_penalty, seed, conversation, owner)
        yield from self.chat.respond({"text": transcript.text, "files": []}, history, *settings, request, progress)

    def speak_reply(self, history: History, enabled: bool, request: gr.Request) -> Iterator[Any]:
        """The newest answer, spoken sentence by sentence while the rest is synthesised."""
        index = last_reply_index(history or [])
        if not enabled or index is None:
            return
        text = spoken_text(text_of(history[index].get("content")))[: self.speaker.max_chars]
        if not text:
            return
        with session_switch(self.speaking, request) as cancel:
            stream = self.speaker.speak(text, cancel=cancel)
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
    voice.hands_free.stream(
        handlers.listen,
        [voice.hands_free, voice.listening],
        [voice.listening, voice.turns, voice.reply_audio, voice.hands_free_status],
        stream_every=LISTEN_EVERY_S,
        time_limit=None,
        api_visibility="private",
        show_progress="hidden",
        concurrency_limit=MODEL_EVENT_CONCURRENCY,
    )
    voice.hands_free.stop_recording(
        handlers.stop_listening,
        voice.listening,
        [voice.listening, voice.hands_free_status],
        api_visibility="private",
        show_progress="hidden",
    )
    turn_inputs = [voice.listening, *inputs[1:]]
    events.append(voice.turns.change(handlers.hands_free_turn, turn_inputs, outputs, **private))
    after(events[-1])
    for event in [*chat_events, *events]:
        event.then(
            handlers.speak_reply,
            [tab.chatbot, voice.speak_replies],
            voice.reply_audio,
            api_visibility="private",
            show_progress="hidden",
        )
    return events
