"""Audio in and out: check and decode a recording before any model hears it; encode speech for
clients, chunk by chunk, so playback can start before the whole text is spoken.

Decoding goes through PyAV (FFmpeg), which faster-whisper itself uses: any common format and
sample rate becomes 16 kHz mono float32. The size is checked before anything is decoded, the
duration from the container's header before decoding and again while decoding (a header may lie).
"""

from __future__ import annotations

import io
import math
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from errors import BadInputError, TooLargeError

WHISPER_RATE = 16_000
OPENAI_PCM_RATE = 24_000  # OpenAI's "pcm" output and the Realtime API: 24 kHz, 16-bit, mono
FORMATS_TEXT = "WAV, MP3, OGG/Opus, FLAC, M4A/AAC or WebM"
SILENCE_PEAK = 1e-3  # a recording whose loudest sample stays below this (about -60 dBFS) is silent

# Output formats: (container, codec, content type)
OUTPUT_FORMATS: dict[str, tuple[str, str, str]] = {
    "mp3": ("mp3", "libmp3lame", "audio/mpeg"),
    "opus": ("ogg", "libopus", "audio/ogg"),
    "aac": ("adts", "aac", "audio/aac"),
    "flac": ("flac", "flac", "audio/flac"),
}
CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", **{k: v[2] for k, v in OUTPUT_FORMATS.items()}}


@dataclass(frozen=True)
class AudioLimits:
    max_bytes: int
    max_seconds: float
    size_key: str = "speech.max_audio_mb"
    length_key: str = "speech.max_audio_seconds"


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32, mono, 16 kHz
    seconds: float
    silent: bool


def decode_audio(source: bytes | Path, limits: AudioLimits) -> DecodedAudio:
    """A recording as 16 kHz mono float32, or BadInputError / TooLargeError saying what is wrong."""
    import av

    size = len(source) if isinstance(source, bytes | bytearray) else _file_size(source)
    if size == 0:
        raise BadInputError("the recording is empty (0 bytes); record or choose an audio file")
    if size > limits.max_bytes:
        raise TooLargeError(
            f"the recording is {size / 2**20:.1f} MB; the limit is {limits.max_bytes / 2**20:g} MB "
            f"({limits.size_key} in config.yaml). Send a shorter or compressed recording."
        )
    data = io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray) else str(source)
    try:
        container = av.open(data, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as error:
        raise BadInputError(f"the file is not audio that can be read ({_reason(error)}); send {FORMATS_TEXT}") from None
    with container:
        streams = container.streams.audio
        if not streams:
            raise BadInputError(f"the file has no audio in it; send {FORMATS_TEXT}")
        stream = streams[0]
        declared = _declared_seconds(container, stream)
        if declared is not None and declared > limits.max_seconds:
            raise TooLargeError(_too_long(declared, limits))
        samples = _decode(container, stream, limits)
    if samples.size == 0:
        raise BadInputError("the recording holds no sound; record again or choose another file")
    seconds = samples.size / WHISPER_RATE
    return DecodedAudio(samples, seconds, silent=float(np.max(np.abs(samples))) < SILENCE_PEAK)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as error:
        raise BadInputError(f"the recording could not be read ({error.strerror})") from None


def _declared_seconds(container: object, stream: object) -> float | None:
    duration = getattr(stream, "duration", None)
    base = getattr(stream, "time_base", None)
    if duration is not None and base is not None:
        return float(duration * base)
    total = getattr(container, "duration", None)  # microseconds
    return total / 1_000_000 if total else None


def _decode(container: object, stream: object, limits: AudioLimits) -> np.ndarray:
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=WHISPER_RATE)
    most = int(limits.max_seconds * WHISPER_RATE)
    pieces: list[np.ndarray] = []
    count = 0
    try:
        for frame in container.decode(stream):  # type: ignore[attr-defined]
            for converted in resampler.resample(frame):
                piece = converted.to_ndarray().reshape(-1)
                pieces.append(piece)
                count += piece.size
            if count > most:
                raise TooLargeError(_too_long(count / WHISPER_RATE, limits, at_least=True))
        for converted in resampler.resample(None):
            pieces.append(converted.to_ndarray().reshape(-1))
    except (av.FFmpegError, ValueError, OSError) as error:
        raise BadInputError(
            f"the recording could not be decoded ({_reason(error)}); it may be damaged: send {FORMATS_TEXT}"
        ) from None
    return np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)


def _too_long(seconds: float, limits: AudioLimits, at_least: bool = False) -> str:
    length = f"more than {_clock(limits.max_seconds)}" if at_least else _clock(seconds)
    return (
        f"the recording is {length} long; the limit is {_clock(limits.max_seconds)} "
        f"({limits.length_key} in config.yaml). Split it into shorter parts."
    )


def _clock(seconds: float) -> str:
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _reason(error: BaseException) -> str:
    """FFmpeg's words without its error number or the file name it was given."""
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(error)).split(": '", 1)[0]
    return text[:120] or type(error).__name__


# ----------------------------------------------------------------------------
# Speech out
# ----------------------------------------------------------------------------


def wav_header(sample_rate: int, data_bytes: int | None = None) -> bytes:
    """A 16-bit mono WAV header; with ``data_bytes`` unknown (streaming), the sizes say "to the end"."""
    size = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI", b"RIFF", riff, b"WAVE", b"fmt ", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16,
        b"data", size,
    )  # fmt: skip


def fix_wav_sizes(path: Path) -> None:
    """Write the real sizes into a WAV file written as a stream ("to the end"), for strict players."""
    data_bytes = path.stat().st_size - len(wav_header(1))
    with path.open("r+b") as handle:
        handle.seek(4)
        handle.write(struct.pack("<I", 36 + data_bytes))
        handle.seek(40)
        handle.write(struct.pack("<I", data_bytes))


def resample_pcm(pcm: bytes, rate_in: int, rate_out: int) -> bytes:
    """16-bit mono PCM at another rate, through FFmpeg's resampler (it filters before it decimates,
    so 48 kHz microphone audio keeps no aliases in Whisper's 16 kHz)."""
    if rate_in == rate_out or not pcm:
        return pcm
    import av

    frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, dtype=np.int16).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate_in
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate_out)
    pieces = [out.to_ndarray().reshape(-1) for out in [*resampler.resample(frame), *resampler.resample(None)]]
    return np.concatenate(pieces).astype(np.int16).tobytes() if pieces else b""


def encode_speech(chunks: Iterable[bytes], sample_rate: int, fmt: str) -> Iterator[bytes]:
    """Encode 16-bit mono PCM chunks (one per sentence) as ``fmt``, yielding bytes as each chunk is done."""
    if fmt == "pcm":
        for chunk in chunks:
            yield resample_pcm(chunk, sample_rate, OPENAI_PCM_RATE)
        return
    if fmt == "wav":
        pieces = iter(chunks)
        first = next(pieces, b"")  # the voice speaks before the header goes: a failure is still an error
        yield wav_header(sample_rate) + first
        yield from pieces
        return
    if fmt not in OUTPUT_FORMATS:
        raise BadInputError(f"unknown audio format '{fmt}'; use one of: {', '.join(CONTENT_TYPES)}")
    yield from _encode_compressed(chunks, sample_rate, *OUTPUT_FORMATS[fmt][:2])


class _Sink(io.RawIOBase):
    """A write-only file that hands on what the muxer wrote since the last look."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._pending += data
        return len(data)

    def take(self) -> bytes:
        data, self._pending = bytes(self._pending), bytearray()
        return data


def _encode_compressed(chunks: Iterable[bytes], sample_rate: int, container_format: str, codec: str) -> Iterator[bytes]:
    import av

    sink = _Sink()
    with av.open(sink, mode="w", format=container_format) as container:
        rate = 48_000 if codec == "libopus" else sample_rate  # Opus takes 48 kHz (and 8/12/16/24)
        stream = container.add_stream(codec, rate=rate, layout="mono")
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
        for chunk in chunks:
            samples = np.frombuffer(chunk, dtype=np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = sample_rate
            for converted in resampler.resample(frame):
                for packet in stream.encode(converted):
                    container.mux(packet)
            if data := sink.take():
                yield data
        for converted in resampler.resample(None):
            for packet in stream.encode(converted):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    if data := sink.take():
        yield data
