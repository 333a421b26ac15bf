"""Faults: running out of memory while loading or generating, and a crash while an image is written.
The manager and the image service are the real ones; the out-of-memory errors are injected."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from errors import OutOfMemoryError
from generator import ImageRequest, ImageService
from model_manager import DeviceBudget, LoadedModel, Loader, LoadSpec, ModelManager
from settings import ImageDefaults, ImageSettings
from stable_diffusion.metadata import remove_partial_files, save_png
from tests.conftest import TINY_SECTIONS, start_app, stop_app, write_config
from tests.test_model_manager import FakeProbe

GIB = 2**30


def other_model(manager: ModelManager) -> LoadSpec:
    """Register a second kind of model and make it resident and idle on the CPU."""
    manager.register_loader(
        "other", Loader(load=lambda spec: LoadedModel(model=object(), reported_bytes=GIB), estimate_bytes=lambda s: GIB)
    )
    spec = LoadSpec.of("other", "/models/other.bin")
    with manager.acquire(spec):
        pass
    return spec


def image_service(tiny_models: Path, tmp_path: Path, manager: ModelManager) -> ImageService:
    settings = ImageSettings(
        model=str(tiny_models / "tiny-sd15"),
        outputs_dir=tmp_path / "outputs",
        min_size=64,
        max_size=256,
        defaults=ImageDefaults(width=64, height=64, steps=2, scheduler="euler"),
    )
    return ImageService(manager, settings, tmp_path, device="cpu")


def labels(manager: ModelManager) -> list[str]:
    return [m.label for m in manager.status().resident]


# -- out of memory while generating ---------------------------------------------------------


def test_out_of_memory_while_generating_makes_room_and_tries_once_more(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = ModelManager(policy="vram_budget", keep_alive_s=-1)
    other = other_model(manager)
    service = image_service(tiny_models, tmp_path, manager)
    real_run = ImageService._run
    failures = iter([OutOfMemoryError("the cpu ran out of memory making a 64x64 image")])

    def run_once_out_of_memory(self: ImageService, *args: object) -> Image.Image:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real_run(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ImageService, "_run", run_once_out_of_memory)
    result = service.generate(ImageRequest(prompt="a tree"))
    assert len(result.images) == 1 and result.images[0].path is not None
    assert any("ran out of memory" in notice and other.label in notice for notice in result.notices)
    assert other.label not in labels(manager)  # the idle model made room
    loaded = [m for m in manager.status().resident if m.kind == "image"]
    assert loaded and not loaded[0].in_use


def test_out_of_memory_twice_is_a_clear_error_and_the_service_keeps_working(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = ModelManager(keep_alive_s=-1)
    service = image_service(tiny_models, tmp_path, manager)
    real_run = ImageService._run
    failures = iter([OutOfMemoryError("the cpu ran out of memory making a 64x64 image; choose a smaller size")] * 2)

    def run_out_of_memory(self: ImageService, *args: object) -> Image.Image:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real_run(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ImageService, "_run", run_out_of_memory)
    with pytest.raises(OutOfMemoryError, match="smaller size"):
        service.generate(ImageRequest(prompt="a tree"))
    assert all(not m.in_use for m in manager.status().resident)
    assert len(service.generate(ImageRequest(prompt="a tree")).images) == 1  # the next request is served


# -- out of memory while loading -------------------------------------------------------------


class TightLoader:
    """Loads "big" only while nothing else is resident: the estimate said it would fit, the device disagrees."""

    def __init__(self, probe: FakeProbe, always_fail: bool = False) -> None:
        self.probe = probe
        self.always_fail = always_fail
        self.attempts = 0

    def load(self, spec: LoadSpec) -> LoadedModel:
        name = Path(spec.path).stem
        if name == "big":
            self.attempts += 1
            if self.always_fail or self.probe.used:
                raise MemoryError("CUDA out of memory")
        self.probe.add(GIB)
        return LoadedModel(model=object(), reported_bytes=GIB, close=lambda: self.probe.add(-GIB))

    def loader(self) -> Loader:
        return Loader(load=self.load, estimate_bytes=lambda spec: GIB)


@pytest.mark.parametrize("always_fail", [False, True])
def test_out_of_memory_while_loading_unloads_idle_models_and_tries_once_more(always_fail: bool) -> None:
    probe = FakeProbe()
    manager = ModelManager(policy="vram_budget", devices={"cpu": DeviceBudget(probe, 8 * GIB)}, keep_alive_s=-1)
    tight = TightLoader(probe, always_fail)
    manager.register_loader("chat", tight.loader())
    small, big = LoadSpec.of("chat", "/m/small.gguf"), LoadSpec.of("chat", "/m/big.gguf")
    with manager.acquire(small):
        pass
    if always_fail:
        with pytest.raises(OutOfMemoryError), manager.acquire(big):
            pass
        assert tight.attempts == 2  # once, and once more after making room
        assert labels(manager) == []  # consistent: nothing half-loaded, the idle model was given up
        with manager.acquire(small):  # and the manager keeps serving
            pass
        return
    with manager.acquire(big):
        assert labels(manager) == [big.label]
    assert tight.attempts == 2
    assert [(r.action, r.label) for r in manager.status().history][-2:] == [
        ("unload", small.label),
        ("load", big.label),
    ]


# -- a crash while an image is written ------------------------------------------------------


def test_a_failure_while_writing_a_png_leaves_no_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def write_half_then_fail(self: Image.Image, handle: object, *args: object, **kwargs: object) -> None:
        handle.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)  # type: ignore[attr-defined]
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", write_half_then_fail)
    with pytest.raises(OSError):
        save_png(Image.new("RGB", (8, 8)), "a tree", tmp_path, 7)
    assert list(tmp_path.iterdir()) == []


def test_files_left_by_a_crashed_writer_are_swept_and_a_running_writers_are_kept(tmp_path: Path) -> None:
    day = tmp_path / "2026-12-03"
    day.mkdir()
    dead = day / ".4194303-abc.part"  # above the kernel's pid limit: no such process
    alive = day / f".{os.getpid()}-def.part"
    for path in (dead, alive):
        path.write_bytes(b"\x89PNG half")
    assert remove_partial_files(tmp_path) == 1
    assert not dead.exists() and alive.exists()


def test_kill_9_while_drawing_loses_nothing_saved_and_leaves_no_half_file(tmp_path: Path, tiny_models: Path) -> None:
    config = write_config(tmp_path, tiny_models, **TINY_SECTIONS)
    app = start_app(config, tmp_path / "app.log")
    outputs = tmp_path / "outputs"
    body = {"prompt": "a tree", "size": "64x64", "n": 8, "steps": 20}
    worker = threading.Thread(
        target=lambda: httpx.post(f"{app.url}/v1/images/generations", json=body, timeout=120), daemon=True
    )
    try:
        worker.start()
        deadline = time.monotonic() + 60
        while not list(outputs.glob("*/*.png")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(app.process.pid, signal.SIGKILL)  # mid-way through the eight images
        app.process.wait(timeout=10)
    finally:
        stop_app(app)
    saved = sorted(outputs.glob("*/*.png"))
    assert saved, "no image was saved before the kill"
    for path in saved:
        with Image.open(path) as image:
            image.load()  # a truncated file would fail here
            assert "a tree" in image.text["parameters"]
    restarted = start_app(config, tmp_path / "app-2.log")
    try:
        assert httpx.get(f"{restarted.url}/health").status_code == 200
    finally:
        stop_app(restarted)
    assert list(outputs.glob("*/.*")) == []  # whatever the crash left half-written is gone
    assert sorted(outputs.glob("*/*.png")) == saved  # and everything saved is still there
