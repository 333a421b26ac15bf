"""The headless command line: argument parsing and the commands that need no browser.

Errors from the services become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from errors import AppError, BadInputError
from generator import ImageRequest
from media.audio import CONTENT_TYPES, encode_speech, fix_wav_sizes
from media.subtitles import to_srt, to_vtt
from services import Services, size_on_disk
from stable_diffusion.request import HIRES_UPSCALERS
from text_generation.stream import TextStream

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser(default_config: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Enclave: a local, offline AI workstation (chat in the browser, an HTTP API, a CLI).",
    )
    parser.set_defaults(config=default_config, verbose=False)
    _add_common_options(parser)
    _add_server_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="start the web UI and API (the default command)")
    _add_common_options(serve)
    _add_server_options(serve)

    chat = commands.add_parser("chat", help="answer one prompt, streamed to stdout")
    _add_common_options(chat)
    chat.add_argument("prompt", help="the prompt, or - to read it from stdin")
    chat.add_argument("--system", help="system prompt (default from config)")
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--seed", type=int, help="-1 for random")
    chat.add_argument("--model", help="chat model name (see the models command; default from config)")
    chat.add_argument("--json", action="store_true", help="print one JSON object with the reply and usage")

    describe = commands.add_parser("describe", help="answer a question about an image, streamed to stdout")
    _add_common_options(describe)
    describe.add_argument("image", type=Path, help="image file (PNG, JPEG, WebP, GIF, BMP, TIFF)")
    describe.add_argument("question", nargs="?", default="", help="question (default from config)")
    describe.add_argument("--temperature", type=float)
    describe.add_argument("--top-p", type=float)
    describe.add_argument("--max-tokens", type=int)
    describe.add_argument("--seed", type=int, help="-1 for random")
    describe.add_argument("--json", action="store_true", help="print one JSON object with the answer and usage")

    generate = commands.add_parser("generate", help="generate images from a prompt (Stable Diffusion)")
    _add_common_options(generate)
    generate.add_argument("prompt", help="what to draw; <lora:name:weight> tags add LoRAs")
    generate.add_argument("--out", type=Path, help="also write the image here (FILE.png; FILE-2.png… for more)")
    generate.add_argument("--negative", help="negative prompt")
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
    generate.add_argument("--steps", type=int)
    generate.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    generate.add_argument("--seed", type=int, help="-1 for random")
    generate.add_argument("-n", "--num-images", type=int)
    generate.add_argument("--scheduler", help="euler_a, dpmpp_2m_karras, ddim or euler")
    generate.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]", help="add a LoRA")
    generate.add_argument("--init-image", type=Path, help="img2img: start from this picture")
    generate.add_argument("--strength", type=float, help="img2img denoising strength, above 0 to 1 (default 0.75)")
    generate.add_argument("--mask", type=Path, help="inpainting: white (or transparent) marks what to repaint")
    generate.add_argument("--resize", choices=["resize", "crop"], default="resize", help="how the picture fits")
    generate.add_argument(
        "--only-masked",
        type=int,
        metavar="PADDING",
        help="inpainting: redraw only the masked area (enlarged, for detail) with PADDING pixels around it",
    )
    generate.add_argument("--hires", help="hires fix: upscale by this much and redraw, e.g. 2x or 1.5")
    generate.add_argument("--hires-strength", type=float, help="the hires pass's denoising strength (default 0.5)")
    generate.add_argument("--hires-steps", type=int, help="the hires pass's steps (default: --steps)")
    generate.add_argument(
        "--upscaler", choices=list(HIRES_UPSCALERS), help="the hires fix's upscaler (default Lanczos)"
    )
    generate.add_argument("--json", action="store_true", help="print one JSON object describing the images")

    transcribe = commands.add_parser("transcribe", help="speech to text: a recording's words on stdout")
    _add_common_options(transcribe)
    transcribe.add_argument("audio", help="audio file (WAV, MP3, OGG/Opus, FLAC, M4A, WebM), or - for stdin")
    transcribe.add_argument("--format", choices=["text", "srt", "vtt", "json"], default="text")
    transcribe.add_argument("--language", help="language code such as en or de (default from config: detected)")
    transcribe.add_argument("--translate", action="store_true", help="translate into English (multilingual models)")

    speak = commands.add_parser("speak", help="text to speech into an audio file")
    _add_common_options(speak)
    speak.add_argument("text", help="what to say, or - to read it from stdin")
    speak.add_argument("--out", required=True, help="FILE.wav (or .mp3, .opus, .flac, .aac), or - for WAV on stdout")
    speak.add_argument("--voice", help="voice name (see the models command; default from config)")
    speak.add_argument("--speed", type=float, help="1.0 is the voice's own pace (0.25 to 4)")

    models = commands.add_parser(
        "models", help="list every configured model (the default), or check and carry the models folder"
    )
    _add_common_options(models)
    models.add_argument("--json", action="store_true", help="print JSON")
    chores = models.add_subparsers(dest="models_command", metavar="ACTION")
    chores.add_parser("list", help="every configured model: present or missing, size, path (the default)")
    fetch = chores.add_parser("download", help="on a connected machine: fetch the models and write the manifest")
    fetch.add_argument("names", nargs="+", help="all, or some of: chat vision sd15 sdxl sdxl-turbo whisper voice")
    fetch.add_argument("--profile", default="24gb", help="what 'all' means: 24gb (default) or 8gb")
    fetch.add_argument("--lora", action="append", default=[], metavar="REPO:FILE", help="also fetch a LoRA")
    chores.add_parser("manifest", help="write models/manifest.json: every file's size and SHA-256")
    check = chores.add_parser("verify", help="check the models folder against its manifest (exit 1 on a problem)")
    check.add_argument("--full", action="store_true", help="compare SHA-256 too (reads every byte), not only sizes")
    carry = chores.add_parser("pack", help="the models folder and its manifest as one archive, or parts")
    carry.add_argument("dest", type=Path, help="archive to write, e.g. /media/usb/models.tar")
    carry.add_argument("--part-size", help="split into parts of at most this size, e.g. 4000M or 2G")
    bring = chores.add_parser("unpack", help="check an archive (or its parts), then put its files in place")
    bring.add_argument("archive", type=Path, help="models.tar, or models.tar.001 for parts")
    return parser


# Options are accepted before or after the command: SUPPRESS keeps a value given
# before the command from being reset by the command's own parser.


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help="settings file (default: config.yaml beside main.py)"
    )
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="log more detail")


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default=argparse.SUPPRESS, help="address to listen on (default from config: server.host)"
    )
    parser.add_argument(
        "--port", type=int, default=argparse.SUPPRESS, help="port to listen on (default from config: server.port)"
    )


@dataclass(frozen=True)
class Console:
    """The streams a command talks to; tests pass their own."""

    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    stdin_bytes: BinaryIO = field(default_factory=lambda: sys.stdin.buffer)
    stdout_bytes: BinaryIO = field(default_factory=lambda: sys.stdout.buffer)

    def json(self, value: Any) -> None:
        self.stdout.write(json.dumps(value, indent=2) + "\n")


def run_command(args: argparse.Namespace, services: Services, console: Console) -> int:
    """Run one headless command; typed errors become one line on stderr and exit code 1."""
    commands: dict[str, Callable[[argparse.Namespace, Services, Console], int]] = {
        "chat": run_chat,
        "describe": run_describe,
        "generate": run_generate,
        "transcribe": run_transcribe,
        "speak": run_speak,
        "models": run_models,
    }
    try:
        return commands[args.command](args, services, console)
    except AppError as error:
        print(f"error: {error}", file=console.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=console.stderr)
        return EXIT_INTERRUPTED


def run_chat(args: argparse.Namespace, services: Services, console: Console) -> int:
    chat = services.chat
    prompt = console.stdin.read() if args.prompt == "-" else args.prompt
    cancel = threading.Event()
    stream = chat.stream(
        [{"role": "user", "content": prompt}],
        chat.defaults.override(**sampling_overrides(args)),
        system_prompt=args.system,
        cancel=cancel,
        model=args.model,
    )
    return print_stream(stream, cancel, args.json, console)


def run_describe(args: argparse.Namespace, services: Services, console: Console) -> int:
    vision = services.vision
    vision.require_installed()
    cancel = threading.Event()
    params = vision.defaults.override(**sampling_overrides(args))
    stream = vision.stream(args.image, [{"role": "user", "content": args.question}], params, cancel=cancel)
    return print_stream(stream, cancel, args.json, console)


def run_generate(args: argparse.Namespace, services: Services, console: Console) -> int:
    images = services.images
    picture = images.read_picture(args.init_image) if args.init_image else None
    request = ImageRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        num_images=args.num_images,
        scheduler=args.scheduler,
        loras=tuple(parse_lora_option(option) for option in args.lora),
        init_image=picture,
        mask=(images.read_mask_for(picture, args.mask) if picture else images.read_mask(args.mask))
        if args.mask
        else None,
        strength=args.strength,
        resize_mode=args.resize,
        inpaint_area="whole" if args.only_masked is None else "only_masked",
        inpaint_padding=args.only_masked,
        hires_upscaler=args.upscaler,
        hires_scale=parse_scale(args.hires) if args.hires else None,
        hires_strength=args.hires_strength,
        hires_steps=args.hires_steps,
    )
    cancel = threading.Event()
    try:
        result = images.generate(request, progress=ProgressBar(console.stderr), cancel=cancel)
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        console.stderr.write("\n")
    written = []
    for number, item in enumerate(result.images, start=1):
        target = None
        if args.out is not None and item.path is not None:
            target = args.out if number == 1 else args.out.with_name(f"{args.out.stem}-{number}{args.out.suffix}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item.path, target)  # the copy keeps the PNG's parameters text
        written.append({"seed": item.seed, "saved": str(item.path), "out": str(target) if target else None})
    if args.json:
        console.json(
            {"model": result.model, "seconds": result.seconds, "cancelled": result.cancelled, "images": written}
        )
    else:
        for row in written:
            console.stdout.write(f"{row['out'] or row['saved']}  (seed {row['seed']})\n")
        for notice in result.notices:
            print(f"note: {notice}", file=console.stderr)
    return 0


def parse_lora_option(option: str) -> tuple[str, float]:
    name, _, weight = option.partition(":")
    try:
        return name, float(weight) if weight else 1.0
    except ValueError:
        raise BadInputError(f"--lora {option}: the weight after ':' must be a number") from None


class ProgressBar:
    """A one-line progress bar on stderr for steps counted by the generator."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self._stream = stream
        self._width = width

    def __call__(self, step: int, total: int) -> None:
        filled = self._width * step // max(total, 1)
        self._stream.write(f"\r[{'#' * filled}{'.' * (self._width - filled)}] {step}/{total} steps")
        self._stream.flush()


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens, "seed": args.seed}


def print_stream(stream: TextStream, cancel: threading.Event, as_json: bool, console: Console) -> int:
    """Stream text to stdout as it comes, or print one JSON object at the end."""
    try:
        if as_json:
            text = stream.text()
            console.json(
                {
                    "model": stream.model_name,
                    "text": text,
                    "finish_reason": stream.finish_reason,
                    "seed": stream.seed,
                    "usage": {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens},
                }
            )
            return 0
        for piece in stream:
            console.stdout.write(piece)
            console.stdout.flush()
    finally:
        cancel.set()
        stream.close()
    console.stdout.write("\n")
    return 0


def run_transcribe(args: argparse.Namespace, services: Services, console: Console) -> int:
    audio = console.stdin_bytes.read() if args.audio == "-" else Path(args.audio)
    if isinstance(audio, Path) and not audio.is_file():
        raise BadInputError(f"{audio} is not a file; give an audio file, or - to read from stdin")
    transcriber = services.transcriber
    decoded = transcriber.decode(audio)
    bar = SecondsBar(console.stderr)
    transcript = transcriber.transcribe(decoded, language=args.language, translate=args.translate, progress=bar)
    console.stderr.write("\n")
    if args.format == "srt":
        console.stdout.write(to_srt(transcript.segments))
    elif args.format == "vtt":
        console.stdout.write(to_vtt(transcript.segments))
    elif args.format == "json":
        segments = [{"start": s.start, "end": s.end, "text": s.text} for s in transcript.segments]
        console.json({"text": transcript.text, "language": transcript.language, "segments": segments})
    else:
        console.stdout.write(transcript.text + "\n")
    return 0


class SecondsBar(ProgressBar):
    """Progress through a recording, in seconds of audio."""

    def __call__(self, done: float, total: float) -> None:  # type: ignore[override]
        filled = int(self._width * done / max(total, 1e-9))
        self._stream.write(f"\r[{'#' * filled}{'.' * (self._width - filled)}] {done:.0f}/{total:.0f} s")
        self._stream.flush()


def run_speak(args: argparse.Namespace, services: Services, console: Console) -> int:
    text = console.stdin.read() if args.text == "-" else args.text
    fmt = "wav" if args.out == "-" else Path(args.out).suffix.lower().lstrip(".")
    if fmt not in CONTENT_TYPES or fmt == "pcm":
        raise BadInputError(f"--out must end in .wav, .mp3, .opus, .flac or .aac (not .{fmt})")
    cancel = threading.Event()
    stream = services.speaker.speak(text, voice=args.voice, speed=args.speed, cancel=cancel)
    try:
        if args.out == "-":
            for piece in encode_speech(stream, stream.sample_rate, fmt):
                console.stdout_bytes.write(piece)
            console.stdout_bytes.flush()
            return 0
        target = Path(args.out)
        partial = target.with_name(target.name + ".part")
        with partial.open("wb") as handle:  # a file that exists is complete
            for piece in encode_speech(stream, stream.sample_rate, fmt):
                handle.write(piece)
        if fmt == "wav":
            fix_wav_sizes(partial)
        partial.replace(target)
    finally:
        cancel.set()
    console.stderr.write(f"wrote {target}\n")
    return 0


def run_models(args: argparse.Namespace, services: Services, console: Console) -> int:
    chore = getattr(args, "models_command", None)
    if chore not in (None, "list"):
        return run_model_files(chore, args, services.chat.models_dir, console)
    rows = []
    for entry in services.catalog():
        path = Path(entry.path)
        rows.append(
            {
                "name": entry.name,
                "capability": entry.capability,
                "present": entry.present,
                "size_bytes": size_on_disk(path) if entry.present else None,
                "path": entry.path,
            }
        )
    if args.json:
        console.json(rows)
        return 0
    for row in rows:
        size = f"{row['size_bytes'] / 2**30:.2f} GiB" if row["size_bytes"] is not None else "-"
        state = "present" if row["present"] else "MISSING"
        console.stdout.write(f"{row['capability']:8} {state:8} {size:>10}  {row['name']}  ({row['path']})\n")
    return 0


def run_model_files(chore: str, args: argparse.Namespace, folder: Path, console: Console) -> int:
    """manifest, verify, pack and unpack on the models folder."""
    from model_files.archive import pack, unpack
    from model_files.manifest import build_manifest, read_manifest, verify, write_manifest

    bar = BytesBar(console.stderr)
    if chore == "download":
        from model_files.download import chosen_sources, download

        sources = chosen_sources(args.names, args.profile, args.lora)
        manifest = download(
            folder, sources, lambda line: console.stdout.write(line + "\n"), os.environ.get("HF_ENDPOINT")
        )
        size = sum(entry["size"] for entry in manifest["files"].values())
        console.stdout.write(f"done: {len(manifest['files'])} files, {size / 2**30:.2f} GiB in {folder}\n")
        return 0
    if chore == "manifest":
        if not folder.is_dir():
            raise BadInputError(f"there is no models folder at {folder}; place the models there first")
        manifest = build_manifest(folder, progress=bar)
        path = write_manifest(folder, manifest)
        size = sum(entry["size"] for entry in manifest["files"].values())
        console.stderr.write(f"\nwrote {path}: {len(manifest['files'])} files, {size / 2**30:.2f} GiB\n")
        return 0
    if chore == "verify":
        report = verify(folder, read_manifest(folder), full=args.full, progress=bar if args.full else None)
        if args.full:
            console.stderr.write("\n")
        for line in report.lines():
            console.stdout.write(line + "\n")
        how = "sizes and SHA-256" if args.full else "sizes (add --full for SHA-256)"
        if report.ok:
            console.stdout.write(f"ok: {report.checked} files match the manifest ({how})\n")
            return 0
        console.stderr.write(f"error: the models folder does not match its manifest ({how})\n")
        return EXIT_ERROR
    if chore == "pack":
        parts = pack(folder, args.dest, parse_size(args.part_size) if args.part_size else None, progress=bar)
        console.stderr.write("\n")
        for path in parts:
            console.stdout.write(f"{path}\n")
        return 0
    result = unpack(args.archive, folder, progress=bar)
    console.stderr.write("\n")
    console.stdout.write(
        f"installed {len(result.installed)} files, {len(result.unchanged)} already in place and unchanged\n"
    )
    return 0


def parse_scale(text: str) -> float:
    """ "2x", "2" or "1.5x"."""
    try:
        return float(text.strip().lower().removesuffix("x"))
    except ValueError:
        raise BadInputError(f"--hires takes a scale such as 2x or 1.5, not '{text}'") from None


def parse_size(text: str) -> int:
    """ "4000M", "2G", "700m", "1.5G" or plain bytes."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number, unit = text.strip()[:-1], text.strip()[-1:].upper()
    if unit.isdigit():
        number, unit = text.strip(), ""
    try:
        size = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise BadInputError(f"'{text}' is not a size; write e.g. 4000M or 2G") from None
    if size <= 0:
        raise BadInputError(f"'{text}' is not a size; write e.g. 4000M or 2G")
    return size


class BytesBar(ProgressBar):
    """Progress through files, in bytes."""

    def __call__(self, done: float, total: float) -> None:  # type: ignore[override]
        filled = int(self._width * done / max(total, 1))
        self._stream.write(
            f"\r[{'#' * filled}{'.' * (self._width - filled)}] {done / 2**30:.2f}/{total / 2**30:.2f} GiB"
        )
        self._stream.flush()
