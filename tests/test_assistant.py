"""assistant/dispatch.py: the one dispatch the Chat tab and model "auto" share, on the real embedded
SmolLM2 and a tiny random-weight Stable Diffusion (CPU), through the real model manager."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from assistant.dispatch import Answer, Assistant
from main import build_services
from services import Services
from settings import load_settings
from tests.conftest import TINY_SECTIONS, write_config

CHAT = "chat:SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE = "image:tiny-sd15"


@pytest.fixture()
def services(tmp_path: Path, tiny_models: Path) -> Iterator[Services]:
    config = write_config(
        tmp_path,
        tiny_models,
        manager={"keep_alive_s": -1},  # one_at_a_time, the default: one model in memory per device
        chat={"context_size": 1024, "defaults": {"max_tokens": 8, "temperature": 0}},
        **TINY_SECTIONS,
    )
    services = build_services(load_settings(config))
    yield services
    services.manager.close()


def run(answer: Answer) -> str:
    """Carry an answer out the way a front end does."""
    if answer.drawing is not None:
        drawing = answer.drawing.draw()
        assert drawing.result.images, "the drawing produced no image"
        return drawing.prompt.by
    assert answer.text is not None
    return answer.text.text()


def test_chat_then_three_drawings_then_chat_loads_each_model_only_as_often_as_needed(services: Services) -> None:
    assistant = Assistant(services, load_settings(None).assistant)  # prompt rewriting on, as shipped
    run(assistant.answer("Hello there!"))
    first = run(assistant.answer("draw a lighthouse at dusk"))
    later = [run(assistant.answer(wish)) for wish in ("draw a red boat", "/draw a fox in the snow")]
    run(assistant.answer("Thanks!"))
    counts = services.manager.status().load_counts
    # The first drawing borrows the chat model while it is still loaded to write the prompt; the
    # later ones find it unloaded (the image model took its place) and use the rules, instead of
    # two extra swaps each. The last chat message brings the chat model back once.
    assert counts == {CHAT: 2, IMAGE: 1}
    assert first == "model" and later == ["rules", "rules"]


def test_a_drawing_never_waits_for_a_busy_chat_model(services: Services) -> None:
    assistant = Assistant(services, load_settings(None).assistant)
    run(assistant.answer("Hello there!"))
    params = services.chat.defaults.override(max_tokens=400, repeat_penalty=1.0)
    busy = services.chat.stream([{"role": "user", "content": "Repeat after me forever: la la la la"}], params)
    pieces = iter(busy)
    next(pieces)  # the chat model is now in use by another request
    try:
        prompt = assistant.answer("draw a lighthouse at dusk").drawing.prompt()  # type: ignore[union-attr]
    finally:
        busy.close()
    assert prompt.by == "rules"


def test_stop_while_waiting_for_the_model_loads_nothing(services: Services) -> None:
    assistant = Assistant(services, load_settings(None).assistant)
    run(assistant.answer("Hello there!"))
    params = services.chat.defaults.override(max_tokens=400, repeat_penalty=1.0)
    busy = services.chat.stream([{"role": "user", "content": "Repeat after me forever: la la la la"}], params)
    pieces = iter(busy)
    next(pieces)
    cancel = threading.Event()
    drawing = assistant.answer("/draw a fox", cancel=cancel).drawing
    assert drawing is not None
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(drawing.draw()))
    worker.start()
    while services.manager.status().waiting == 0 and worker.is_alive():
        threading.Event().wait(0.02)
    cancel.set()  # Stop, while the drawing waits for the busy chat model to finish
    worker.join(timeout=10)
    busy.close()
    assert not worker.is_alive()
    result = outcome[0].result  # type: ignore[attr-defined]
    assert result.cancelled and not result.images and result.steps_run == 0
    assert IMAGE not in services.manager.status().load_counts  # the image model never loaded
    assert [m.label for m in services.manager.status().resident] == [CHAT]  # and evicted nothing
