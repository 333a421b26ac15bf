"""The core of OpenAI's Realtime API over a WebSocket (``/v1/realtime``), for voice clients that
are not browsers: 24 kHz 16-bit mono PCM in, transcripts and 24 kHz PCM speech out.

A session keeps a conversation. Audio arrives with ``input_audio_buffer.append``; with server
voice activity detection (the default, Silero as faster-whisper ships it) the end of speech
commits the buffer, its transcript is added as the user's turn and a response starts; without
it, the client commits and asks with ``response.create``. A response streams the chat model's
words as ``response.audio_transcript.delta`` (or ``response.text.delta``), then speaks them
sentence by sentence as ``response.audio.delta``. Speech that starts during a response, or
``response.cancel``, stops it (barge-in). Event names and shapes follow OpenAI's published
description of the API.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

from api.auth import key_matches
from errors import AppError, BadInputError
from media.audio import OPENAI_PCM_RATE, WHISPER_RATE, DecodedAudio, resample_pcm
from services import Services
from settings import ServerSettings
from speech_to_text import speech_segments
from text_to_speech import speak_as_written

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 2 * 2**20  # one client event; audio comes in many small appends
MAX_BUFFER_SECONDS = 120  # audio waiting to be committed
VAD_EVERY_BYTES = OPENAI_PCM_RATE * 2 // 5  # look for the end of speech every 200 ms of new audio
AUDIO_DELTA_BYTES = OPENAI_PCM_RATE * 2 // 5  # speech goes out in 200 ms pieces
KEY_PROTOCOL = "openai-insecure-api-key."  # how browser clients pass a key (no headers on a WebSocket)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


@dataclass
class SessionConfig:
    modalities: list[str] = field(default_factory=lambda: ["text", "audio"])
    instructions: str = ""
    voice: str | None = None
    turn_detection: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 500,
            "create_response": True,
            "interrupt_response": True,
        }
    )
    temperature: float = 0.8
    max_response_output_tokens: int | str = "inf"

    def as_event(self, session_id: str) -> dict[str, Any]:
        return {
            "id": session_id,
            "object": "realtime.session",
            "model": "enclave-realtime",
            "modalities": self.modalities,
            "instructions": self.instructions,
            "voice": self.voice or "default",
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "input_audio_transcription": {"model": "whisper-1"},
            "turn_detection": self.turn_detection,
            "tools": [],
            "tool_choice": "auto",
            "temperature": self.temperature,
            "max_response_output_tokens": self.max_response_output_tokens,
        }

    def update(self, changes: dict[str, Any]) -> None:
        if not isinstance(changes, dict):
            raise BadInputError("session must be an object")
        for name in ("input_audio_format", "output_audio_format"):
            if changes.get(name, "pcm16") != "pcm16":
                raise BadInputError(f"{name} must be pcm16 (24 kHz, 16-bit, mono)")
        if "modalities" in changes:
            modalities = changes["modalities"]
            if not isinstance(modalities, list) or not set(modalities) <= {"text", "audio"} or "text" not in modalities:
                raise BadInputError('modalities must be ["text"] or ["text", "audio"]')
            self.modalities = list(modalities)
        if "instructions" in changes:
            self.instructions = str(changes["instructions"])[:32_000]
        if "voice" in changes:
            self.voice = str(changes["voice"])
        if "turn_detection" in changes:
            detection = changes["turn_detection"]
            if detection is not None and (not isinstance(detection, dict) or detection.get("type") != "server_vad"):
                raise BadInputError('turn_detection must be {"type": "server_vad", ...} or null')
            self.turn_detection = None if detection is None else {**(self.turn_detection or {}), **detection}
        if "temperature" in changes:
            temperature = changes["temperature"]
            if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
                raise BadInputError("temperature must be a number from 0 to 2")
            self.temperature = float(temperature)
        if "max_response_output_tokens" in changes:
            limit = changes["max_response_output_tokens"]
            if limit != "inf" and not (isinstance(limit, int) and 1 <= limit <= 32768):
                raise BadInputError('max_response_output_tokens must be a number from 1 to 32768, or "inf"')
            self.max_response_output_tokens = limit


def pcm16_to_whisper(pcm: bytes) -> DecodedAudio:
    """24 kHz PCM16 as the 16 kHz float32 samples Whisper and the VAD take."""
    resampled = resample_pcm(pcm, OPENAI_PCM_RATE, WHISPER_RATE)
    samples = np.frombuffer(resampled, dtype=np.int16).astype(np.float32) / 32768.0
    return DecodedAudio(samples, samples.size / WHISPER_RATE, float(np.max(np.abs(samples), initial=0)) < 1e-3)


class RealtimeSession:
    def __init__(self, socket: WebSocket, services: Services) -> None:
        self._socket = socket
        self._services = services
        self._loop = asyncio.get_running_loop()
        self._id = new_id("sess")
        self.config = SessionConfig()
        self._buffer = bytearray()
        self._checked_bytes = 0
        self._speech_item: str | None = None
        self._items: list[dict[str, Any]] = []  # {"id", "role", "text"}
        self._response: asyncio.Task[None] | None = None
        self._cancel: threading.Event | None = None
        self._send_lock = asyncio.Lock()
        self._closed = False

    # -- sending ----------------------------------------------------------------------------

    async def send(self, kind: str, **fields: Any) -> None:
        """One server event; after the client has gone, nothing (the response is being stopped)."""
        if self._closed:
            return
        async with self._send_lock:
            try:
                await self._socket.send_text(json.dumps({"event_id": new_id("event"), "type": kind, **fields}))
            except (WebSocketDisconnect, RuntimeError, OSError):
                self._closed = True

    def send_from_thread(self, kind: str, **fields: Any) -> None:
        asyncio.run_coroutine_threadsafe(self.send(kind, **fields), self._loop).result()

    async def error(self, message: str, code: str = "invalid_request", event_id: str | None = None) -> None:
        body = {"type": "invalid_request_error", "code": code, "message": message, "param": None, "event_id": event_id}
        await self.send("error", error=body)

    # -- the session ------------------------------------------------------------------------

    async def run(self) -> None:
        await self.send("session.created", session=self.config.as_event(self._id))
        try:
            while True:
                text = await self._socket.receive_text()
                await self._handle(text)
        except WebSocketDisconnect:
            self._closed = True
        finally:
            await self._stop_response()

    async def _handle(self, text: str) -> None:
        if len(text) > MAX_EVENT_BYTES:
            await self.error(f"an event may be at most {MAX_EVENT_BYTES // 2**20} MB; append audio in pieces")
            return
        try:
            event = json.loads(text)
            if not isinstance(event, dict):
                raise ValueError("not an object")
        except ValueError:
            await self.error("each message must be one JSON object with a 'type'")
            return
        kind, event_id = event.get("type"), event.get("event_id")
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit_requested,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._create_item,
            "response.create": self._response_requested,
            "response.cancel": self._cancel_requested,
        }
        handler = handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            await self.error(
                f"unknown event type '{str(kind)[:60]}'; supported: {', '.join(handlers)}", "unknown_event"
            )
            return
        try:
            await handler(event)
        except AppError as problem:
            await self.error(str(problem), event_id=event_id if isinstance(event_id, str) else None)

    async def _session_update(self, event: dict[str, Any]) -> None:
        self.config.update(event.get("session") or {})
        await self.send("session.updated", session=self.config.as_event(self._id))

    async def _append(self, event: dict[str, Any]) -> None:
        try:
            pcm = base64.b64decode(str(event.get("audio", "")), validate=True)
        except (binascii.Error, ValueError):
            raise BadInputError("audio must be base64-encoded PCM16 (24 kHz, mono)") from None
        if len(pcm) % 2:
            raise BadInputError("PCM16 audio has an even number of bytes; this piece has an odd one")
        if len(self._buffer) + len(pcm) > MAX_BUFFER_SECONDS * OPENAI_PCM_RATE * 2:
            self._buffer.clear()
            raise BadInputError(f"more than {MAX_BUFFER_SECONDS} s of audio without a commit; the buffer was cleared")
        self._buffer += pcm
        if self.config.turn_detection is not None and len(self._buffer) - self._checked_bytes >= VAD_EVERY_BYTES:
            self._checked_bytes = len(self._buffer)
            await self._detect_turn()

    async def _detect_turn(self) -> None:
        detection = self.config.turn_detection or {}
        audio = pcm16_to_whisper(bytes(self._buffer))
        segments = await asyncio.to_thread(speech_segments, audio, detection)
        if not segments:
            return
        if self._speech_item is None:
            self._speech_item = new_id("item")
            start_ms = segments[0]["start"] * 1000 // WHISPER_RATE
            await self.send("input_audio_buffer.speech_started", audio_start_ms=start_ms, item_id=self._speech_item)
            if self._response is not None and detection.get("interrupt_response", True):
                await self._stop_response()  # barge-in: the user talks over the answer
        silence_ms = (audio.samples.size - segments[-1]["end"]) * 1000 // WHISPER_RATE
        if silence_ms >= int(detection.get("silence_duration_ms", 500)):
            end_ms = segments[-1]["end"] * 1000 // WHISPER_RATE
            await self.send("input_audio_buffer.speech_stopped", audio_end_ms=end_ms, item_id=self._speech_item)
            await self._commit(respond=bool(detection.get("create_response", True)))

    async def _commit_requested(self, event: dict[str, Any]) -> None:
        if len(self._buffer) < OPENAI_PCM_RATE * 2 // 10:
            raise BadInputError("the audio buffer holds less than 100 ms of audio; append more before committing")
        await self._commit(respond=False)

    async def _commit(self, respond: bool) -> None:
        pcm, item_id = bytes(self._buffer), self._speech_item or new_id("item")
        self._buffer.clear()
        self._checked_bytes, self._speech_item = 0, None
        previous = self._items[-1]["id"] if self._items else None
        await self.send("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        item = {"id": item_id, "role": "user", "text": ""}
        self._items.append(item)
        await self.send("conversation.item.created", previous_item_id=previous, item=self._item_event(item, "audio"))
        try:
            transcript = await asyncio.to_thread(self._services.transcriber.transcribe, pcm16_to_whisper(pcm))
        except AppError as problem:
            self._items.remove(item)
            await self.send(
                "conversation.item.input_audio_transcription.failed",
                item_id=item_id,
                content_index=0,
                error={"type": "transcription_error", "code": "transcription_failed", "message": str(problem)},
            )
            return
        item["text"] = transcript.text
        await self.send(
            "conversation.item.input_audio_transcription.completed",
            item_id=item_id,
            content_index=0,
            transcript=transcript.text,
        )
        if respond:
            await self._start_response()

    async def _clear(self, event: dict[str, Any]) -> None:
        self._buffer.clear()
        self._checked_bytes, self._speech_item = 0, None
        await self.send("input_audio_buffer.cleared")

    async def _create_item(self, event: dict[str, Any]) -> None:
        item = event.get("item") or {}
        role = item.get("role")
        parts = item.get("content") if isinstance(item.get("content"), list) else []
        text = " ".join(str(p.get("text", "")) for p in parts if isinstance(p, dict) and p.get("type") in (
            "input_text", "text"
        )).strip()  # fmt: skip
        if item.get("type", "message") != "message" or role not in ("user", "assistant", "system") or not text:
            raise BadInputError("conversation.item.create takes a message item with text content (input_text)")
        previous = self._items[-1]["id"] if self._items else None
        created = {"id": str(item.get("id") or new_id("item"))[:64], "role": role, "text": text[:32_000]}
        self._items.append(created)
        await self.send("conversation.item.created", previous_item_id=previous, item=self._item_event(created, "text"))

    async def _response_requested(self, event: dict[str, Any]) -> None:
        if self._response is not None:
            raise BadInputError("a response is already in progress; cancel it first (response.cancel)")
        await self._start_response()

    async def _cancel_requested(self, event: dict[str, Any]) -> None:
        await self._stop_response()

    @staticmethod
    def _item_event(item: dict[str, Any], kind: str) -> dict[str, Any]:
        content_type = "input_audio" if kind == "audio" else "input_text"
        content = {"type": content_type, "transcript" if kind == "audio" else "text": item["text"] or None}
        return {"id": item["id"], "object": "realtime.item", "type": "message", "status": "completed",
                "role": item["role"], "content": [content]}  # fmt: skip

    # -- responses ----------------------------------------------------------------------------

    async def _start_response(self) -> None:
        if not any(item["role"] == "user" and item["text"] for item in self._items):
            raise BadInputError("there is nothing to respond to yet: append and commit audio, or create an item")
        self._cancel = threading.Event()
        response = Response(new_id("resp"), new_id("item"))
        await self.send("response.created", response=response.body("in_progress"))
        self._response = asyncio.create_task(self._respond(response, self._cancel))

    async def _respond(self, response: Response, cancel: threading.Event) -> None:
        status = "failed"
        try:
            await asyncio.to_thread(self._produce, response, cancel)
            status = "cancelled" if cancel.is_set() else "completed"
        except AppError as problem:
            await self.error(str(problem), "response_failed")
        except Exception:
            log.exception("realtime response %s failed", response.id)
            await self.error("the response failed unexpectedly; the log has details", "server_error")
        finally:
            if response.text:
                self._items.append({"id": response.item_id, "role": "assistant", "text": response.text})
            await self.send("response.done", response=response.body(status))
            self._response = None

    def _produce(self, response: Response, cancel: threading.Event) -> None:
        """The answer's words as they are written, and each sentence spoken as soon as it is complete."""
        audio = "audio" in self.config.modalities
        ids = {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}
        chat = self._services.chat
        messages = [{"role": i["role"], "content": i["text"]} for i in self._items if i["text"]]
        limit = self.config.max_response_output_tokens
        params = chat.defaults.override(
            temperature=min(max(self.config.temperature, 0.0), 2.0),
            max_tokens=limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
        )
        stream = chat.stream(messages, params, system_prompt=self.config.instructions or None, cancel=cancel)
        if not audio:
            for piece in stream:
                response.text += piece
                self.send_from_thread("response.text.delta", delta=piece, **ids)
            if not cancel.is_set():
                self.send_from_thread("response.text.done", text=response.text, **ids)
            return
        speaker = self._services.speaker
        voice = self.config.voice if self.config.voice in speaker.voices() else None
        rate = speaker.resolve_voice(voice)[0].sample_rate

        def write(piece: str) -> None:
            response.text += piece
            self.send_from_thread("response.audio_transcript.delta", delta=piece, **ids)

        def say(chunk: bytes) -> None:
            pcm = resample_pcm(chunk, rate, OPENAI_PCM_RATE)
            for start in range(0, len(pcm), AUDIO_DELTA_BYTES):
                piece = base64.b64encode(pcm[start : start + AUDIO_DELTA_BYTES]).decode("ascii")
                self.send_from_thread("response.audio.delta", delta=piece, **ids)

        def speak(sentence: str) -> Any:
            return speaker.speak(sentence[: speaker.max_chars], voice=voice, cancel=cancel)

        speak_as_written(stream, speak, write, say, cancel)
        if not cancel.is_set():
            self.send_from_thread("response.audio_transcript.done", transcript=response.text, **ids)
            self.send_from_thread("response.audio.done", **ids)

    async def _stop_response(self) -> None:
        task, cancel = self._response, self._cancel
        if task is None or cancel is None:
            return
        cancel.set()  # reaches the model manager's queue, the chat model and the voice
        await asyncio.shield(task)


@dataclass
class Response:
    id: str
    item_id: str
    text: str = ""

    def body(self, status: str) -> dict[str, Any]:
        output = []
        if self.text:
            output = [
                {
                    "id": self.item_id,
                    "object": "realtime.item",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed" if status == "completed" else "incomplete",
                    "content": [{"type": "audio", "transcript": self.text}],
                }
            ]
        return {"id": self.id, "object": "realtime.response", "status": status, "output": output}


def key_given(socket: WebSocket) -> str | None:
    """The key from the Authorization header, or (browsers) from a subprotocol."""
    scheme, _, token = socket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for protocol in socket.headers.get("sec-websocket-protocol", "").split(","):
        if protocol.strip().startswith(KEY_PROTOCOL):
            return protocol.strip()[len(KEY_PROTOCOL) :]
    return None


def add_realtime_route(app: Any, services: Services, server: ServerSettings) -> None:
    @app.websocket("/v1/realtime")
    async def realtime(socket: WebSocket) -> None:
        if server.api_key and not key_matches(key_given(socket) or "", server.api_key):
            await socket.close(code=1008, reason="missing or wrong API key")
            return
        offered = [p.strip() for p in socket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        await socket.accept(subprotocol="realtime" if "realtime" in offered else None)
        await RealtimeSession(socket, services).run()
