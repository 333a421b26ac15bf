"""The bundle of services the front ends share: one model manager and the services
that borrow models from it."""

from __future__ import annotations

from dataclasses import dataclass

from chat import ChatService
from model_manager import CatalogEntry, ModelManager


@dataclass(frozen=True)
class Services:
    manager: ModelManager
    chat: ChatService

    def catalog(self) -> list[CatalogEntry]:
        """Every model the app knows, installed or not."""
        return [*self.chat.models()]
