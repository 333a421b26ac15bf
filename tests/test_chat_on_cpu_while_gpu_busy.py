"""Chat on the CPU while the GPU is busy (chat.cpu_when_gpu_busy).

There is no GPU here: the manager gets a second device named "cuda" with a fake memory probe, the
chat model is placed there as on a GPU machine (llama.cpp built for the CPU runs the "GPU" layers on
the CPU), and a fake image model on that device is held in use, as while a picture is drawn. The
chat model is the real embedded SmolLM2 through the real ChatService.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from chat import ChatService
from model_manager import GIB, CpuMemoryProbe, DeviceBudget, LoadSpec, ModelManager
from settings import ChatSettings, GenerationDefaults
from tests.test_model_manager import FakeLoader, FakeProbe, Worker, make, spec, wait_until

IMAGE = LoadSpec.of("image", "/models/sd.bin", device="cuda")
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture()
def manager() -> Iterator[ModelManager]:
    cuda = FakeProbe("cuda")
    manager = ModelManager(
        devices={"cpu": DeviceBudget(CpuMemoryProbe(), 16 * GIB), "cuda": DeviceBudget(cuda, 24 * GIB)},
        keep_alive_s=-1,
        wait_timeout_s=60,
    )
    images = FakeLoader({"cpu": FakeProbe("cpu"), "cuda": cuda}, {"sd": 4 * GIB})
    manager.register_loader("image", images.as_loader())
    yield manager
    manager.close()


def chat_service(manager: ModelManager, embedded_model: Path, *, fallback: bool) -> ChatService:
    settings = ChatSettings(
        context_size=1024,
        cpu_when_gpu_busy=fallback,
        defaults=GenerationDefaults(max_tokens=6, temperature=0),
    )
    return ChatService(manager, settings, embedded_model, gpu_offload=lambda: True)


def drawing(manager: ModelManager) -> tuple[Worker, threading.Event]:
    """A request holding the GPU's image model until the returned event is set."""
    return drawing_of(manager, IMAGE)


def test_a_message_while_the_gpu_draws_is_answered_on_the_cpu_at_once(
    manager: ModelManager, embedded_model: Path
) -> None:
    chat = chat_service(manager, embedded_model, fallback=True)
    assert chat.load_spec(embedded_model).device == "cuda", "the model belongs on the GPU here"
    worker, release = drawing(manager)
    try:
        stream = chat.stream(HELLO)
        answer = stream.text()  # completes while the image model is still in use
        assert answer and stream.device == "cpu"
        on_cpu = [m for m in manager.status().resident if m.kind == "chat"]
        assert [m.device for m in on_cpu] == ["cpu"]
        assert any(m.kind == "image" and m.in_use for m in manager.status().resident)
    finally:
        release.set()
        worker.join()
    later = chat.stream(HELLO)
    assert later.text() and later.device == "cuda", "with the GPU free again, chat goes back to it"


def test_without_the_setting_the_message_waits_for_the_gpu(manager: ModelManager, embedded_model: Path) -> None:
    chat = chat_service(manager, embedded_model, fallback=False)
    worker, release = drawing(manager)
    stream = chat.stream(HELLO)
    reply = Worker(stream.text).start()
    try:
        wait_until(lambda: manager.status().waiting == 1, "the chat request waits for the GPU", timeout=30)
        assert reply.finished_at is None
    finally:
        release.set()
        worker.join()
    reply.join(60)
    assert reply.error is None and reply.result and stream.device == "cuda"


def test_would_wait_follows_the_policy() -> None:
    one = make(cuda_budget_gib=24)
    gpu_a, gpu_b = spec("a", device="cuda"), spec("b", device="cuda")
    assert not one.manager.would_wait(gpu_a), "an idle device: a load, not a wait"
    worker, release = drawing_of(one.manager, gpu_b)
    try:
        assert one.manager.would_wait(gpu_a), "one_at_a_time: a must wait for b to finish"
        assert not one.manager.would_wait(spec("a")), "the CPU is not busy"
        assert one.manager.would_wait(gpu_b), "b itself is in use"
    finally:
        release.set()
        worker.join()
    assert not one.manager.would_wait(gpu_b), "b is resident and idle"
    budget = make(policy="vram_budget", cuda_budget_gib=24)
    worker, release = drawing_of(budget.manager, gpu_b)
    try:
        assert not budget.manager.would_wait(gpu_a), "vram_budget: a fits beside b"
    finally:
        release.set()
        worker.join()


def drawing_of(manager: ModelManager, load_spec: LoadSpec) -> tuple[Worker, threading.Event]:
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with manager.acquire(load_spec):
            entered.set()
            release.wait(300)  # a slow machine may take long to answer; the test sets it

    worker = Worker(hold).start()
    assert entered.wait(30), f"{load_spec.label} was never lent"
    return worker, release
