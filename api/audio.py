"""The OpenAI-compatible audio routes: transcriptions, translations (speech to text) and speech
(text to speech, streamed sentence by sentence)."""

from __future__ import annotations

import threading
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import ConfigDict, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from api.audit import note
from api.errors import ApiError
from api.protocol import CheckedBody, echo
from errors import BadInputError, TooLargeError
from media.audio import CONTENT_TYPES, encode_speech
from media.subtitles import to_srt, to_vtt
from services import Services
from speech_to_text import Transcript

# What OpenAI's clients send by default, taken to mean this server's own model or voice.
TRANSCRIPTION_ALIASES = frozenset({"whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "auto"})
SPEECH_ALIASES = frozenset({"tts-1", "tts-1-hd", "gpt-4o-mini-tts", "auto"})
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse", "marin", "cedar"}
)
TRANSCRIPT_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MAX_PROMPT_CHARS = 2000


class SpeechRequest(CheckedBody):
    model_config = ConfigDict(extra="allow")  # instructions, stream_format: accepted, not used

    model: str = "tts-1"
    input: str
    voice: str = "alloy"
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)


def add_audio_routes(router: APIRouter, services: Services) -> None:
    async def transcribe(request: Request, translate: bool, **form: Any) -> Any:
        response_format = form["response_format"]
        if response_format not in TRANSCRIPT_FORMATS:
            raise BadInputError(f"response_format must be one of {', '.join(TRANSCRIPT_FORMATS)}")
        model = form["model"]
        if model not in TRANSCRIPTION_ALIASES and model != services.transcriber.model_name:
            raise ApiError(
                404, f"unknown speech-to-text model '{echo(model)}'; GET /v1/models lists them", "model_not_found"
            )
        prompt = form.get("prompt") or None
        if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
            raise TooLargeError(f"the prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
        upload: UploadFile = form["file"]
        data = await _read_limited(upload, services.transcriber.limits.max_bytes)
        note(request, model=services.transcriber.model_name, route="transcription")
        words = "word" in (form.get("granularities") or [])
        cancel = threading.Event()
        try:
            decoded = await run_in_threadpool(services.transcriber.decode, data)
            transcript = await run_in_threadpool(
                lambda: services.transcriber.transcribe(
                    decoded,
                    language=form.get("language") or None,
                    prompt=prompt,
                    translate=translate,
                    word_timestamps=words,
                    cancel=cancel,
                )
            )
        finally:
            cancel.set()
        return transcript_response(transcript, response_format, "translate" if translate else "transcribe", words)

    @router.post("/audio/transcriptions", response_model=None)
    async def audio_transcriptions(
        request: Request,
        file: Annotated[UploadFile, File()],
        model: Annotated[str, Form()] = "whisper-1",
        language: Annotated[str | None, Form()] = None,
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[str, Form()] = "json",
        temperature: Annotated[float | None, Form()] = None,
        timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
    ) -> Any:
        return await transcribe(
            request,
            False,
            file=file,
            model=model,
            language=language,
            prompt=prompt,
            response_format=response_format,
            granularities=timestamp_granularities,
        )

    @router.post("/audio/translations", response_model=None)
    async def audio_translations(
        request: Request,
        file: Annotated[UploadFile, File()],
        model: Annotated[str, Form()] = "whisper-1",
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[str, Form()] = "json",
        temperature: Annotated[float | None, Form()] = None,
    ) -> Any:
        return await transcribe(request, True, file=file, model=model, prompt=prompt, response_format=response_format)

    @router.post("/audio/speech", response_model=None)
    async def audio_speech(body: SpeechRequest, request: Request) -> Response:
        speaker = services.speaker
        if body.model not in SPEECH_ALIASES and body.model not in speaker.voices():
            raise ApiError(
                404, f"unknown speech model '{echo(body.model)}'; GET /v1/models lists them", "model_not_found"
            )
        # OpenAI's voice names mean this server's configured voice; a voice of its own is asked for by name.
        voice = None if body.voice in OPENAI_VOICES else body.voice
        if voice is None and body.model in speaker.voices():
            voice = body.model
        note(request, model=voice or "default voice", route="speech", prompt=body.input)
        cancel = threading.Event()
        stream = await run_in_threadpool(
            lambda: speaker.speak(body.input, voice=voice, speed=body.speed, cancel=cancel)
        )
        encoded = encode_speech(stream, stream.sample_rate, body.response_format)
        try:
            first = await run_in_threadpool(next, encoded, b"")  # the voice loads now: a failure is an HTTP status
        except BaseException:
            cancel.set()
            raise

        async def body_bytes() -> Any:
            try:
                yield first
                async for piece in iterate_in_threadpool(encoded):
                    yield piece
            finally:  # done, or the client left: stop speaking, give the voice back
                cancel.set()
                encoded.close()

        return StreamingResponse(body_bytes(), media_type=CONTENT_TYPES[body.response_format])


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    """The uploaded file's bytes, refused as soon as it passes ``limit``."""
    data = bytearray()
    while chunk := await upload.read(1 << 20):
        data += chunk
        if len(data) > limit:
            raise TooLargeError(
                f"the recording is over {limit / 2**20:g} MB (speech.max_audio_mb in config.yaml); "
                "send a shorter or compressed recording"
            )
    return bytes(data)


def transcript_response(transcript: Transcript, response_format: str, task: str, words: bool) -> Any:
    if response_format == "text":
        return PlainTextResponse(transcript.text + "\n")
    if response_format == "srt":
        return PlainTextResponse(to_srt(transcript.segments), media_type="application/x-subrip")
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(transcript.segments), media_type="text/vtt")
    usage = {"type": "duration", "seconds": round(transcript.duration)}
    if response_format == "json":
        return {"text": transcript.text, "usage": usage}
    body: dict[str, Any] = {
        "task": task,
        "language": transcript.language,
        "duration": round(transcript.duration, 3),
        "text": transcript.text,
        "segments": [
            {
                "id": number,
                "seek": s.seek,
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text,
                "tokens": list(s.tokens),
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for number, s in enumerate(transcript.segments)
        ],
        "usage": usage,
    }
    if words:
        body["words"] = [
            {"word": w.strip(), "start": round(a, 3), "end": round(b, 3)}
            for s in transcript.segments
            for a, b, w in s.words
        ]
    return body
