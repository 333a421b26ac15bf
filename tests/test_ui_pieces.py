"""The UI's plain-Python pieces, without a browser: number fields that refuse instead of
clamping, a chatbot's history as the store keeps it, what the saver refuses to keep, and
the Models tab's inventory."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from conversations.store import ConversationStore
from model_manager import ModelManager
from services import Services
from settings import ChatSettings, ImageSettings, SpeechSettings, VisionSettings
from webui.common import error_bubble, hint_bubble, plain_history
from webui.conversations_panel import Saver
from webui.fields import Bounds
from webui.history import conversation_image, to_stored

WIDTH = Bounds("Width", 256, 2048, integer=True, multiple_of=8)
TEMPERATURE = Bounds("Temperature", 0, 2)
SEED = Bounds("Seed", 0, 2**31 - 1, integer=True, special=-1)


@pytest.mark.parametrize(
    "bounds, value, problem",
    [
        (WIDTH, 512, None),
        (WIDTH, 256, None),
        (WIDTH, 2048, None),
        (WIDTH, 100, "Width 100 is not used: allowed is 256–2048, a multiple of 8."),
        (WIDTH, 2056, "Width 2056 is not used: allowed is 256–2048, a multiple of 8."),
        (WIDTH, 260, "Width 260 is not used: allowed is 256–2048, a multiple of 8."),
        (WIDTH, 512.5, "Width 512.5 is not used: allowed is 256–2048, a multiple of 8."),
        (WIDTH, None, "Width is empty; enter 256–2048, a multiple of 8."),
        (TEMPERATURE, 0, None),
        (TEMPERATURE, 1.35, None),
        (TEMPERATURE, 5, "Temperature 5 is not used: allowed is 0–2."),
        (TEMPERATURE, -0.1, "Temperature -0.1 is not used: allowed is 0–2."),
        (TEMPERATURE, "warm", "Temperature must be a number: 0–2."),
        (TEMPERATURE, float("inf"), "Temperature must be a number: 0–2."),
        (TEMPERATURE, float("nan"), "Temperature must be a number: 0–2."),
        (WIDTH, 1e300, "Width 1e+300 is not used: allowed is 256–2048, a multiple of 8."),
        (SEED, -1, None),
        (SEED, -2, "Seed -2 is not used: allowed is 0–2147483647, a whole number, or -1."),
        (SEED, 7.5, "Seed 7.5 is not used: allowed is 0–2147483647, a whole number, or -1."),
    ],
)
def test_a_value_out_of_range_is_refused_with_the_range_never_changed(
    bounds: Bounds, value: object, problem: str | None
) -> None:
    assert bounds.problem(value) == problem


# -- the history as it is kept -----------------------------------------------------------------------


def gradio_shape(role: str, *parts: dict, metadata: dict | None = None) -> dict:
    """A message as Gradio hands it to a handler: a list of typed parts."""
    return {"role": role, "content": list(parts), "metadata": metadata, "options": None}


def test_the_browsers_history_is_kept_as_text_and_images(tmp_path: Path) -> None:
    picture = "/tmp/gradio/abc/green.png"
    history = [
        gradio_shape("user", {"type": "file", "file": {"path": picture, "url": "x"}, "alt_text": None}),
        gradio_shape("user", {"type": "text", "text": "What is it?"}),
        gradio_shape("assistant", {"type": "text", "text": ""}, metadata={"title": "→ vision model", "status": "done"}),
        gradio_shape("assistant", {"type": "text", "text": "A green square."}),
        error_bubble("The model is busy; try again."),
    ]
    assert to_stored(history) == [
        {"role": "user", "content": {"path": picture, "alt_text": None}},
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "", "metadata": {"title": "→ vision model", "status": "done"}},
        {"role": "assistant", "content": "A green square."},
        {"role": "assistant", "content": "⚠️ The model is busy; try again.", "metadata": {"log": "error"}},
    ]
    assert conversation_image(history) == picture


def test_errors_hints_and_stop_marks_never_reach_a_model() -> None:
    history = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I *(stopped)*"},
        hint_bubble("Attach an image to ask about it."),
        error_bubble("Something failed."),
        {"role": "user", "content": "Go on"},
    ]
    assert plain_history(history) == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I"},
        {"role": "user", "content": "Go on"},
    ]


def test_the_saver_keeps_only_images_from_its_own_folders(tmp_path: Path) -> None:
    uploads, elsewhere = tmp_path / "uploads", tmp_path / "elsewhere"
    uploads.mkdir(), elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(uploads / "mine.png")
    Image.new("RGB", (8, 8)).save(elsewhere / "secret.png")
    store = ConversationStore(tmp_path / "data")
    saver = Saver(store, (uploads,))
    history = [
        {"role": "user", "content": {"path": str(uploads / "mine.png")}},
        {"role": "user", "content": {"path": str(uploads / ".." / "elsewhere" / "secret.png")}},
        {"role": "user", "content": "Compare them."},
    ]
    conversation = saver.save("me", "", history)
    kept = store.get("me", conversation).messages
    assert Path(kept[0]["content"]["path"]).read_bytes() == (uploads / "mine.png").read_bytes()
    assert kept[1]["content"] == "(image not kept)"
    assert [p.name for p in (store.files_dir / conversation).iterdir()] == [Path(kept[0]["content"]["path"]).name]


def test_a_failed_save_never_breaks_the_reply(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "data")
    saver = Saver(store, ())
    conversation = saver.save("me", "", [{"role": "user", "content": "Hi"}])
    store.delete("me", conversation)  # deleted in another tab meanwhile
    assert saver.save("me", conversation, [{"role": "user", "content": "Hi again"}]) == conversation


# -- the Models tab's inventory ----------------------------------------------------------------------


def test_the_inventory_lists_present_and_missing_models_with_where_and_how(
    tmp_path: Path, embedded_model: Path
) -> None:
    from chat import ChatService
    from generator import ImageService
    from speech_to_text import TranscriptionService
    from text_to_speech import SpeechService
    from vision import VisionService
    from webui.image_tab import lora_choices

    models = tmp_path / "models"
    models.mkdir()
    manager = ModelManager(keep_alive_s=-1)
    services = Services(
        manager=manager,
        chat=ChatService(manager, ChatSettings(), models / "mistral.gguf"),
        vision=VisionService(manager, VisionSettings(), models / "llava-1.5-7b-hf"),
        images=ImageService(
            manager, ImageSettings(inpainting_model="stable-diffusion-inpainting"), models, device="cpu"
        ),
        transcriber=TranscriptionService(manager, SpeechSettings(), models),
        speaker=SpeechService(manager, SpeechSettings(), models),
    )
    rows = {(row.kind, row.name): row for row in services.inventory()}
    mistral = rows[("chat", "mistral")]
    assert not mistral.present and not mistral.selected and mistral.path == models / "mistral.gguf"
    assert "huggingface-cli download TheBloke/Mistral-7B-Instruct-v0.2-GGUF" in mistral.how_to_get
    assert str(models / "mistral.gguf") in mistral.how_to_get
    embedded = rows[("chat", "SmolLM2-135M-Instruct")]
    assert embedded.present and embedded.selected and embedded.size_bytes == embedded_model.stat().st_size
    assert not rows[("vision", "llava-1.5-7b-hf")].present
    image = rows[("image", "stable-diffusion-v1-5")]
    assert not image.present and str(models / "stable-diffusion-v1-5") in image.how_to_get
    inpainting = rows[("image", "stable-diffusion-inpainting")]
    assert not inpainting.present and "models download sd15-inpainting" in inpainting.how_to_get
    assert not [row for row in rows.values() if row.kind == "lora"]
    picker = lora_choices(services.images)
    assert picker["choices"] == [] and not picker["interactive"]
    assert str(models / "lora") in picker["label"], "an empty LoRA picker says where LoRAs go"
    # After a load, the row says it is loaded, with what the manager measured.
    services.chat.complete([{"role": "user", "content": "Hi"}], services.chat.defaults.override(max_tokens=2))
    embedded = next(row for row in services.inventory() if row.name == "SmolLM2-135M-Instruct")
    assert embedded.loaded is not None and embedded.last_load is not None and embedded.last_load.seconds > 0
    manager.close()
