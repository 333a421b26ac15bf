"""Swap latency: what the user waits for when the model manager changes models.

For each module (the embedded chat model, a random-weight LLaVA 768 wide, a tiny random SD 1.5,
the embedded Whisper tiny.en and Piper voice): a cold load (the files dropped from the page cache
with posix_fadvise), a warm load (the files still cached) and an unload (until the manager
measured the memory back), each beside its floor: the model's bytes divided by the read bandwidth
measured in the same run (from disk for cold, from the page cache for warm). Then the sequence
chat -> image -> vision -> transcription -> speech -> chat with a small real request each, under
``one_at_a_time`` (every step swaps) and ``vram_budget`` (everything stays resident), and the
time the second policy saves, and the same under ``one_at_a_time`` with a warm tier (evicted
PyTorch models parked in RAM; on the CPU they stay where they are). CPU figures; on a GPU the
floor for warm loads is bytes / host-to-device bandwidth (bench/gpu.sh).
Usage: python bench/swap.py [--json FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny model builders

import offline  # noqa: F401, I001 - keep libraries offline

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from chat import ChatService, find_embedded_model
from generator import ImageRequest, ImageService
from model_manager import GIB, LoadSpec, ModelManager, detect_devices
from settings import ChatSettings, ImageDefaults, ImageSettings, SpeechSettings, VisionSettings
from speech_to_text import TranscriptionService
from text_to_speech import SpeechService
from vision import VisionService

from page_cache import drop_from_page_cache, files_of, read_bandwidth
from rows import Row, write_rows

RUNS = 3


@dataclass
class Module:
    name: str
    spec: Callable[[], LoadSpec]
    request: Callable[[], Any]  # a small real request through the service


def build_modules(manager: ModelManager, scratch: Path) -> Iterator[Module]:
    from tiny_diffusion import build_sd15
    from tiny_llava import build_tiny_llava

    from speech_to_text import find_embedded_whisper
    from text_to_speech import find_embedded_voice

    chat_path, whisper, voice = find_embedded_model(), find_embedded_whisper(), find_embedded_voice()
    if chat_path is None or whisper is None or voice is None:
        sys.exit("the embedded models are missing: run 'make run' (or make test-setup) first")
    chat = ChatService(manager, ChatSettings(context_size=2048), chat_path)
    yield Module(
        "chat",
        lambda: chat.load_spec(chat_path),
        lambda: chat.complete([{"role": "user", "content": "Hi"}], chat.defaults.override(max_tokens=8)),
    )
    sd = build_sd15(scratch / "sd")
    images = ImageService(
        manager,
        ImageSettings(model=str(sd.folder), outputs_dir=scratch / "out", min_size=64,
                      defaults=ImageDefaults(width=64, height=64, steps=2)),
        scratch,
        config_dirs={"sd15": sd.config, "sdxl": sd.config},
    )  # fmt: skip
    yield Module(
        "image",
        lambda: images.load_spec(images.resolve_model()),
        lambda: images.generate(ImageRequest("a lighthouse"), save=False),
    )
    llava = build_tiny_llava(scratch / "llava", hidden_size=768)
    vision = VisionService(manager, VisionSettings(), llava)
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    yield Module(
        "vision",
        vision.load_spec,
        lambda: vision.complete(picture, [{"role": "user", "content": "What is it?"}], vision.defaults),
    )
    speaker = SpeechService(manager, SpeechSettings(), Path("/nonexistent"))
    voice_spec = speaker.load_spec(speaker.resolve_voice()[0])
    clip = scratch / "spoken.wav"  # something to transcribe: the voice reads a sentence
    spoken = b"".join(speaker.speak("The quick brown fox jumps over the lazy dog."))
    write_wav(clip, np.frombuffer(spoken, dtype=np.int16), speaker.resolve_voice()[0].sample_rate)
    transcriber = TranscriptionService(manager, SpeechSettings(), Path("/nonexistent"), cuda=lambda: False)
    yield Module("transcription", lambda: transcriber.load_spec(whisper), lambda: transcriber.transcribe(clip))
    yield Module("speech", lambda: voice_spec, lambda: list(speaker.speak("Hello.")))
    del voice


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    import wave

    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())


def last_record(manager: ModelManager, action: str, label: str) -> Any:
    return next(r for r in reversed(manager.status().history) if r.action == action and r.label == label)


def load_times(manager: ModelManager, module: Module) -> dict[str, float]:
    spec = module.spec()
    path = Path(spec.path)
    manager.unload_all()
    cold, warm, unload = [], [], []
    for _ in range(RUNS):
        drop_from_page_cache(path)
        with manager.acquire(spec):
            pass
        cold.append(last_record(manager, "load", spec.label).seconds)
        manager.unload(spec.label)
        unload.append(last_record(manager, "unload", spec.label).seconds)
        with manager.acquire(spec):
            pass
        warm.append(last_record(manager, "load", spec.label).seconds)
        manager.unload(spec.label)
    size = sum(f.stat().st_size for f in files_of(path))
    return {
        "bytes": size,
        "cold": statistics.median(cold),
        "warm": statistics.median(warm),
        "unload": statistics.median(unload),
        "disk": read_bandwidth(path, cold=True),
        "cache": read_bandwidth(path, cold=False),
    }


def warm_tier_times(scratch: Path) -> dict[str, tuple[float, float]]:
    """Per PyTorch module: (load from disk, move back from the warm tier) in seconds, medians, under
    one_at_a_time with a warm tier: the module is evicted by the other one and comes back. On the
    CPU a parked model stays where it is, so the move back is the manager's bookkeeping alone."""
    manager = ModelManager(devices=detect_devices(24 * GIB), keep_alive_s=-1, warm_tier_bytes=4 * GIB)
    modules = {m.name: m for m in build_modules(manager, scratch / "warm") if m.name in ("image", "vision")}
    times: dict[str, tuple[float, float]] = {}
    for name, other in (("image", "vision"), ("vision", "image")):
        spec, other_spec = modules[name].spec(), modules[other].spec()
        cold, back = [], []
        for _ in range(RUNS):
            manager.unload_all()
            with manager.acquire(spec):
                pass
            cold.append(last_record(manager, "load", spec.label).seconds)
            with manager.acquire(other_spec):  # evicts (parks) the first
                pass
            with manager.acquire(spec):
                pass
            back.append(last_record(manager, "unpark", spec.label).seconds)
        times[name] = (statistics.median(cold), statistics.median(back))
    manager.close()
    return times


def sequence(policy: str, scratch: Path, warm_tier_bytes: int = 0) -> tuple[float, float]:
    """Seconds for chat -> image -> vision -> transcription -> speech -> chat (after a warm-up pass),
    and the seconds of it spent loading and unloading (parking and moving back included)."""
    manager = ModelManager(
        policy=policy,  # type: ignore[arg-type]
        devices=detect_devices(24 * GIB),
        keep_alive_s=-1,
        warm_tier_bytes=warm_tier_bytes,
    )
    modules = {m.name: m for m in build_modules(manager, scratch / f"{policy}-{warm_tier_bytes}")}
    order = ["chat", "image", "vision", "transcription", "speech", "chat"]
    for name in order:  # warm-up: everything loaded once, files in the page cache
        modules[name].request()
    swaps_before = sum(r.seconds for r in manager.status().history)
    started = time.perf_counter()
    for name in order:
        modules[name].request()
    total = time.perf_counter() - started
    swapping = sum(r.seconds for r in manager.status().history) - swaps_before
    manager.close()
    return total, swapping


class PretendGpu:
    """A memory probe for a device named "cuda" on a machine without one: the chat model placed on
    it runs on the CPU (llama.cpp built for the CPU), but the manager treats it as the GPU."""

    device = "cuda"

    def used_bytes(self) -> int:
        return 0

    def release_cache(self) -> None:
        pass


def chat_while_gpu_busy(scratch: Path, fallback: bool) -> float:
    """Seconds to the first piece of a chat reply asked for while a picture is being drawn on the
    GPU. There is no GPU here: the drawing holds a pretended "cuda" device for as long as a real tiny
    SD 1.5 picture (128 px, 20 steps) took on this CPU, measured first, without using the CPU while
    it holds it, as a GPU's drawing leaves the CPU free. With chat.cpu_when_gpu_busy the reply comes
    from a copy of the chat model on the CPU; without, it waits for the drawing. Medians of RUNS."""
    import threading

    from tiny_diffusion import build_sd15

    from model_manager import CpuMemoryProbe, DeviceBudget, LoadedModel, Loader

    devices = {"cpu": DeviceBudget(CpuMemoryProbe(), 16 * GIB), "cuda": DeviceBudget(PretendGpu(), 24 * GIB)}
    manager = ModelManager(devices=devices, keep_alive_s=-1)
    manager.register_loader("drawing", Loader(load=lambda spec: LoadedModel(object()), estimate_bytes=lambda spec: GIB))
    chat_path = find_embedded_model()
    assert chat_path is not None
    chat = ChatService(manager, ChatSettings(context_size=2048, cpu_when_gpu_busy=fallback), chat_path,
                       gpu_offload=lambda: True)  # fmt: skip
    sd = build_sd15(scratch / f"busy-{fallback}")
    images = ImageService(
        manager,
        ImageSettings(model=str(sd.folder), outputs_dir=scratch / "out", min_size=64,
                      defaults=ImageDefaults(width=128, height=128, steps=20)),
        scratch,
        config_dirs={"sd15": sd.config, "sdxl": sd.config},
    )  # fmt: skip
    images.generate(ImageRequest("a lighthouse"), save=False)  # loaded, warmed up
    drawing_seconds = images.generate(ImageRequest("a lighthouse"), save=False).seconds
    manager.unload_all()
    list(chat.stream([{"role": "user", "content": "Hi"}], chat.defaults.override(max_tokens=2)))  # GPU copy loaded
    gpu_drawing = LoadSpec.of("drawing", "/pretend/sd.bin", device="cuda")
    waits = []
    for _ in range(RUNS):
        drawing_started = threading.Event()

        def draw(started: threading.Event = drawing_started) -> None:
            with manager.acquire(gpu_drawing):  # the GPU is busy for as long as the picture took
                started.set()
                time.sleep(drawing_seconds)

        drawer = threading.Thread(target=draw)
        drawer.start()
        drawing_started.wait()
        asked = time.perf_counter()
        stream = chat.stream([{"role": "user", "content": "Hi"}], chat.defaults.override(max_tokens=8))
        next(iter(stream))
        waits.append(time.perf_counter() - asked)
        stream.close()
        drawer.join()
    manager.close()
    return statistics.median(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the figures here (for bench/run.py)")
    args = parser.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as temporary:
        scratch = Path(temporary)
        manager = ModelManager(devices=detect_devices(24 * GIB), keep_alive_s=-1)
        print(f"{'module':14}{'MiB':>8}{'cold s':>9}{'floor':>8}{'warm s':>9}{'floor':>8}{'unload s':>10}")
        for module in build_modules(manager, scratch / "single"):
            measured = load_times(manager, module)
            cold_floor = measured["bytes"] / measured["disk"]
            warm_floor = measured["bytes"] / measured["cache"]
            print(f"{module.name:14}{measured['bytes'] / 2**20:8.1f}{measured['cold']:9.3f}{cold_floor:8.3f}"
                  f"{measured['warm']:9.3f}{warm_floor:8.3f}{measured['unload']:10.3f}")  # fmt: skip
            rows.append(
                Row(f"swap: {module.name} cold load vs bytes/disk read", "s", cold_floor, measured["cold"], False)
            )
            rows.append(Row(f"swap: {module.name} warm load vs bytes/page-cache read", "s", warm_floor,
                            measured["warm"], False))  # fmt: skip
            rows.append(Row(f"swap: {module.name} unload (memory measured back)", "s", None, measured["unload"], False))
        manager.close()
        for name, (cold, back) in warm_tier_times(scratch).items():
            print(f"warm tier, {name}: load from disk {cold:.3f} s, back from RAM {back:.4f} s")
            rows.append(Row(f"swap: {name} back from the warm tier vs loaded from disk (CPU)", "s", cold, back, False))
        waited, answered = chat_while_gpu_busy(scratch, False), chat_while_gpu_busy(scratch, True)
        print(f"chat first piece while a picture is drawn: waits {waited:.2f} s, on a CPU copy {answered:.2f} s")
        rows.append(Row("chat first piece while the GPU draws: CPU copy vs waiting (GPU busy pretended)", "s", waited,
                        answered, False))  # fmt: skip
        one, one_loading = sequence("one_at_a_time", scratch)
        warm, warm_loading = sequence("one_at_a_time", scratch, warm_tier_bytes=4 * GIB)
        budget, budget_loading = sequence("vram_budget", scratch)
    print(f"sequence chat->image->vision->transcription->speech->chat: one_at_a_time {one:.2f} s "
          f"({one_loading:.2f} s swapping), with the warm tier {warm:.2f} s ({warm_loading:.2f} s), "
          f"vram_budget {budget:.2f} s ({budget_loading:.2f} s)")  # fmt: skip
    rows.append(Row("swap sequence, 6 small requests: vram_budget vs one_at_a_time", "s", one, budget, False))
    rows.append(Row("swap sequence: one_at_a_time with the warm tier vs without", "s", one, warm, False))
    rows.append(Row("swap sequence: loading and unloading under one_at_a_time", "s", None, one_loading, False))
    rows.append(Row("swap sequence: loading, parking and moving back with the warm tier", "s", None, warm_loading,
                    False))  # fmt: skip
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
