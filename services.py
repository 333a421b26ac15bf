"""The bundle of services the front ends share: one model manager and the services
that borrow models from it."""

from __future__ import annotations

from dataclasses import dataclass

from chat import ChatService
from generator import ImageService
from model_manager import CatalogEntry, ModelManager
from vision import VisionService


@dataclass(frozen=True)
class Services:
    manager: ModelManager
    chat: ChatService
    vision: VisionService
    images: ImageService

    def catalog(self) -> list[CatalogEntry]:
        """Every model the app knows, installed or not."""
        image_path = self.images.model_path
        return [
            *self.chat.models(),
            *self.vision.models(),
            CatalogEntry(image_path.stem, "image", str(image_path), self.images.availability() is None),
        ]
