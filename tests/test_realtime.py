"""/v1/realtime: a Realtime client session over a real WebSocket against the running app, with the
embedded Whisper, SmolLM2 and Piper voice. Speech in is espeak-ng's, resampled to 24 kHz PCM16."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from media.audio import OPENAI_PCM_RATE, resample_pcm
from tests.conftest import RunningApp

CHUNK = 4800  # 100 ms of 24 kHz PCM16
SILENCE = b"\0\0" * OPENAI_PCM_RATE  # one second


def spoken(tmp_path: Path, sentence: str) -> bytes:
    path = tmp_path / "spoken.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(path), sentence], check=True)
    with wave.open(str(path)) as recording:
        return resample_pcm(recording.readframes(recording.getnframes()), recording.getframerate(), OPENAI_PCM_RATE)


class Client:
    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.seen: list[dict[str, Any]] = []

    async def send(self, kind: str, **fields: Any) -> None:
        await self.socket.send(json.dumps({"type": kind, **fields}))

    async def append(self, pcm: bytes) -> None:
        for start in range(0, len(pcm), CHUNK):
            await self.send("input_audio_buffer.append", audio=base64.b64encode(pcm[start : start + CHUNK]).decode())

    async def until(self, kind: str, timeout_s: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            event = json.loads(await asyncio.wait_for(self.socket.recv(), max(0.1, deadline - time.monotonic())))
            self.seen.append(event)
            if event["type"] == kind:
                return event

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.seen if event["type"] == kind]


def session(app: RunningApp, coroutine: Any) -> Any:
    async def run() -> Any:
        url = app.url.replace("http://", "ws://") + "/v1/realtime?model=enclave"
        async with websockets.connect(url, max_size=None) as socket:
            client = Client(socket)
            created = await client.until("session.created")
            assert created["session"]["input_audio_format"] == "pcm16"
            return await coroutine(client)

    return asyncio.run(run())


def models_in_use(app: RunningApp) -> list[str]:
    return [m["label"] for m in httpx.get(f"{app.url}/api/status").json()["resident"] if m["in_use"]]


def test_speech_in_transcript_and_speech_out(running_app: RunningApp, tmp_path: Path) -> None:
    question = spoken(tmp_path, "What is the capital of France?")

    async def talk(client: Client) -> None:
        await client.send("session.update", session={"instructions": "Answer in one short sentence."})
        await client.until("session.updated")
        await client.append(question + SILENCE)  # server VAD: the silence ends the turn
        await client.until("input_audio_buffer.speech_stopped")
        heard = await client.until("conversation.item.input_audio_transcription.completed")
        assert "capital of france" in heard["transcript"].lower()
        done = await client.until("response.done")
        assert done["response"]["status"] == "completed"
        words = "".join(e["delta"] for e in client.of("response.audio_transcript.delta"))
        assert words.strip() and done["response"]["output"][0]["content"][0]["transcript"] == words
        speech = b"".join(base64.b64decode(e["delta"]) for e in client.of("response.audio.delta"))
        samples = len(speech) // 2
        assert samples > OPENAI_PCM_RATE // 2, "at least half a second of speech came back"
        assert client.of("response.audio.done")

    session(running_app, talk)
    assert models_in_use(running_app) == []


def test_text_turns_and_a_cancelled_response(running_app: RunningApp) -> None:
    async def talk(client: Client) -> None:
        await client.send("session.update", session={"modalities": ["text", "audio"], "temperature": 0})
        await client.until("session.updated")
        await client.send(
            "conversation.item.create",
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell a long story."}]},
        )
        await client.until("conversation.item.created")
        await client.send("response.create")
        await client.until("response.audio_transcript.delta")
        await client.send("response.cancel")
        done = await client.until("response.done", timeout_s=10)
        assert done["response"]["status"] == "cancelled"
        assert not client.of("response.audio.done"), "a cancelled response is not spoken to its end"

    session(running_app, talk)
    deadline = time.monotonic() + 5
    while models_in_use(running_app) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert models_in_use(running_app) == []


def test_talking_over_an_answer_stops_it(running_app: RunningApp, tmp_path: Path) -> None:
    interruption = spoken(tmp_path, "Stop, please.")

    async def talk(client: Client) -> None:
        await client.send(
            "conversation.item.create",
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell a long story."}]},
        )
        await client.send("response.create")
        await client.until("response.audio_transcript.delta")
        await client.append(interruption)  # speech during the answer: barge-in
        await client.until("input_audio_buffer.speech_started")
        done = await client.until("response.done", timeout_s=15)
        assert done["response"]["status"] == "cancelled"

    session(running_app, talk)


@pytest.mark.parametrize(
    "event, message",
    [
        ("not json", "one JSON object"),
        ({"type": "bogus.event"}, "unknown event type 'bogus.event'"),
        ({"type": "input_audio_buffer.append", "audio": "***"}, "base64"),
        ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}, "odd"),
        ({"type": "input_audio_buffer.commit"}, "less than 100 ms"),
        ({"type": "response.create"}, "nothing to respond to"),
        ({"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}}, "pcm16"),
        ({"type": "session.update", "session": {"temperature": 9}}, "temperature"),
    ],
)
def test_a_bad_event_gets_an_error_event_and_the_session_goes_on(
    running_app: RunningApp, event: Any, message: str
) -> None:
    async def talk(client: Client) -> None:
        await client.socket.send(event if isinstance(event, str) else json.dumps(event))
        error = await client.until("error", timeout_s=10)
        assert message in error["error"]["message"]
        await client.send("input_audio_buffer.clear")
        await client.until("input_audio_buffer.cleared", timeout_s=10)  # still answering

    session(running_app, talk)


def test_the_official_sdks_realtime_client_talks_to_it(running_app: RunningApp, tmp_path: Path) -> None:
    from openai import OpenAI

    client = OpenAI(
        api_key="unused",
        base_url=f"{running_app.url}/v1",
        websocket_base_url=running_app.url.replace("http://", "ws://") + "/v1",
    )
    question = spoken(tmp_path, "What is the capital of France?")
    seen: list[str] = []
    speech = 0
    with client.beta.realtime.connect(model="enclave") as connection:
        connection.session.update(session={"instructions": "Answer in one short sentence."})
        connection.input_audio_buffer.append(audio=base64.b64encode(question + SILENCE).decode())
        for event in connection:  # the SDK parses each event into its own typed model
            seen.append(event.type)
            if event.type == "conversation.item.input_audio_transcription.completed":
                assert "capital of france" in event.transcript.lower()
            if event.type == "response.audio.delta":
                speech += len(base64.b64decode(event.delta))
            if event.type == "response.done":
                assert event.response.status == "completed"
                break
    assert "response.audio_transcript.delta" in seen and speech > OPENAI_PCM_RATE  # over half a second
