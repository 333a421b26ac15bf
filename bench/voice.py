"""Voice: the speech services against faster-whisper and Piper called directly, in one run, and
the latency of a whole voice turn split into its parts.

1. Transcription of a ~30-second clip (espeak-ng sentences): speech_to_text.py against
   faster-whisper's own WhisperModel on the same decoded samples, same compute type and
   threads. Real-time factor (seconds of compute per second of audio) and the ratio raw/ours
   (1.0 = no overhead; target >= 0.97).
2. Synthesis of a paragraph: text_to_speech.py against PiperVoice.synthesize directly.
3. One voice turn with the embedded models, as the Realtime endpoint runs it: end of speech ->
   transcript -> first token of the answer -> first audio out, with one model at a time and with
   all three resident (manager.policy vram_budget).

Sides alternate within each round so neither always runs on a warm cache. Absolute times
only mean something on the machine that printed them. Usage: python bench/voice.py [--runs N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import offline  # noqa: F401, I001 - keep libraries offline

import argparse
import statistics
import subprocess
import tempfile
import time
import wave

from chat import ChatService, find_embedded_model
from media.audio import AudioLimits, decode_audio
from model_manager import ModelManager
from settings import ChatSettings, SpeechSettings
from speech_to_text import TranscriptionService, find_embedded_whisper
from text_to_speech import SpeechService, find_embedded_voice, read_voice, speak_as_written

from rows import Row, write_rows

SENTENCES = [
    "The lighthouse keeper climbed the stairs every evening.",
    "Ships passed the rocks safely because of the bright lamp.",
    "In the winter storms the waves reached the top of the tower.",
    "A small boat brought food and oil once a month.",
    "The keeper wrote the weather in a book each morning.",
    "Children from the village came to visit in the summer.",
    "Today the light runs by itself and nobody lives there.",
    "Tourists walk along the coast to take pictures of it.",
]
PARAGRAPH = (
    "Good morning. The weather today is mild with a light breeze from the west. "
    "Rain is expected in the late afternoon, so take an umbrella if you go out. "
    "Tomorrow will be sunny and a little warmer."
)


def speak_clip(folder: Path) -> Path:
    """About 30 s of speech: the sentences read by espeak-ng, one after the other."""
    parts = []
    for number, sentence in enumerate(SENTENCES):
        part = folder / f"part{number}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(part), sentence], check=True)
        parts.append(str(part))
    clip = folder / "clip.wav"
    subprocess.run(["sox", *parts, str(clip), "pad", "0", "0.3"], check=True)
    return clip


def seconds_of(path: Path) -> float:
    with wave.open(str(path)) as recording:
        return recording.getnframes() / recording.getframerate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here (for bench/run.py)")
    args = parser.parse_args()
    whisper_folder, voice_path, chat_path = find_embedded_whisper(), find_embedded_voice(), find_embedded_model()
    if whisper_folder is None or voice_path is None or chat_path is None:
        sys.exit("the embedded models are missing: run 'make run' (or make test-setup) first")

    from faster_whisper import WhisperModel
    from piper import PiperVoice

    manager = ModelManager(keep_alive_s=-1)
    settings = SpeechSettings()
    transcriber = TranscriptionService(manager, settings, Path("/nonexistent"), cuda=lambda: False)
    speaker = SpeechService(manager, settings, Path("/nonexistent"))
    with tempfile.TemporaryDirectory() as temporary:
        clip = speak_clip(Path(temporary))
        audio_seconds = seconds_of(clip)
        decoded = decode_audio(clip, AudioLimits(2**30, 3600))

        # -- 1. transcription ---------------------------------------------------------------
        raw_model = WhisperModel(str(whisper_folder), device="cpu", compute_type="int8", cpu_threads=args.threads)

        def raw_transcribe() -> str:
            segments, _ = raw_model.transcribe(decoded.samples, language="en", vad_filter=True, beam_size=5)
            return " ".join(s.text.strip() for s in segments)

        raw_transcribe(), transcriber.transcribe(decoded)  # both loaded and warm: transcription is measured
        raw_times, our_times = [], []
        for run in range(args.runs):
            order = [("raw", raw_transcribe), ("ours", lambda: transcriber.transcribe(decoded).text)]
            for name, work in order if run % 2 == 0 else reversed(order):
                started = time.perf_counter()
                work()
                (raw_times if name == "raw" else our_times).append(time.perf_counter() - started)
        raw_rtf = statistics.median(raw_times) / audio_seconds
        our_rtf = statistics.median(our_times) / audio_seconds

        # -- 2. synthesis ---------------------------------------------------------------------
        raw_voice = PiperVoice.load(voice_path)
        voice = read_voice(voice_path, "embedded")
        list(raw_voice.synthesize("Warm up.")), list(speaker.speak("Warm up."))
        raw_synth, our_synth = [], []
        spoken_seconds = 0.0
        for run in range(args.runs):
            order = ["raw", "ours"] if run % 2 == 0 else ["ours", "raw"]
            for name in order:
                started = time.perf_counter()
                if name == "raw":
                    chunks = [c.audio_int16_bytes for c in raw_voice.synthesize(PARAGRAPH)]
                    raw_synth.append(time.perf_counter() - started)
                else:
                    chunks = list(speaker.speak(PARAGRAPH))
                    our_synth.append(time.perf_counter() - started)
                spoken_seconds = sum(len(c) for c in chunks) / 2 / voice.sample_rate

        # -- 3. a voice turn -----------------------------------------------------------------------
        question = Path(temporary) / "question.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(question), "What is the capital of France?"], check=True)
        turns = {policy: voice_turns(policy, chat_path, question, args) for policy in ("one_at_a_time", "vram_budget")}
    manager.close()
    print(f"clip: {audio_seconds:.1f} s of speech; paragraph: {spoken_seconds:.1f} s spoken; runs: {args.runs}")
    print(f"{'':34}{'raw':>10}{'ours':>10}{'raw/ours':>10}")
    print(f"{'transcription real-time factor':34}{raw_rtf:>10.3f}{our_rtf:>10.3f}{raw_rtf / our_rtf:>10.3f}")
    raw_s, our_s = statistics.median(raw_synth), statistics.median(our_synth)
    print(f"{'synthesis real-time factor':34}{raw_s / spoken_seconds:>10.3f}{our_s / spoken_seconds:>10.3f}"
          f"{raw_s / our_s:>10.3f}")  # fmt: skip
    print("a voice turn, median seconds     transcript  1st token  1st audio (all from the end of speech)")
    rows = [
        Row("transcription real-time factor (Whisper tiny.en, VAD)", "RTF", raw_rtf, our_rtf, False, maximum=1.03),
        Row("synthesis real-time factor (Piper joe-medium)", "RTF", raw_s / spoken_seconds, our_s / spoken_seconds,
            False, maximum=1.03),
    ]  # fmt: skip
    for policy, measured in turns.items():
        heard, first_token, first_audio = (statistics.median(t[i] for t in measured) for i in range(3))
        print(f"  {policy:31}{heard:>10.2f}{first_token:>11.2f}{first_audio:>11.2f}")
        rows.append(Row(f"voice turn: end of speech to first audio, {policy}", "s", None, first_audio, False))
    write_rows(args.json, rows)


def voice_turns(policy: str, chat_path: Path, question: Path, args: argparse.Namespace) -> list[tuple[float, ...]]:
    """Whisper, then the chat model, then the voice, as the Realtime endpoint runs a turn. With
    one_at_a_time each model evicts the one before (the voice waits for the whole answer); with
    vram_budget all three stay resident and the first sentence is spoken while the rest is written."""
    manager = ModelManager(policy=policy, keep_alive_s=-1)  # type: ignore[arg-type]
    transcriber = TranscriptionService(manager, SpeechSettings(), Path("/nonexistent"), cuda=lambda: False)
    speaker = SpeechService(manager, SpeechSettings(), Path("/nonexistent"))
    chat = ChatService(manager, ChatSettings(context_size=2048, threads=args.threads), chat_path)
    measured = []
    for run in range(args.runs + 1):  # the first turn loads everything: not counted
        started = time.perf_counter()
        text = transcriber.transcribe(question).text
        heard = time.perf_counter()
        marks: dict[str, float] = {}
        speak_as_written(  # as the Realtime endpoint answers: each sentence spoken once it is written
            chat.stream([{"role": "user", "content": text}], chat.defaults.override(max_tokens=48)),
            speaker.speak,
            lambda _piece, marks=marks: marks.setdefault("token", time.perf_counter()),
            lambda _chunk, marks=marks: marks.setdefault("audio", time.perf_counter()),
        )
        first_token, first_audio = marks.get("token"), marks.get("audio")
        if run:
            measured.append((heard - started, (first_token or heard) - started, (first_audio or heard) - started))
    manager.close()
    return measured


if __name__ == "__main__":
    main()
