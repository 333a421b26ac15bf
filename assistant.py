"""One conversation that chats, looks at images and draws.

The assistant decides where a message goes (router.py), then hands it to the chat
model, the vision model or the image generator. Front ends show the decision and
its reason next to the answer; every decision is logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from errors import BadInputError, ModelMissingError
from generator import GenerationResult, ImageRequest
from router import ImagePrompt, RouteDecision, chat_model_resident, decide_route, image_prompt_by_rules
from router import interpret_image_request as interpret_with_model
from services import Services
from settings import AssistantSettings
from text_generation import GenerationParams, Message, TextStream

log = logging.getLogger(__name__)

DESTINATIONS = {"chat": "chat model", "vision": "vision model", "image": "image generator"}


def route_title(decision: RouteDecision) -> str:
    """The line shown above a routed answer: "→ image generator: asked to draw"."""
    return f"→ {DESTINATIONS[decision.route]}: {decision.reason}"


@dataclass(frozen=True)
class Drawing:
    prompt: ImagePrompt
    result: GenerationResult


class Assistant:
    def __init__(self, services: Services, settings: AssistantSettings) -> None:
        self._services = services
        self._settings = settings

    def decide(self, text: str, *, has_image: bool) -> RouteDecision:
        """Rules first; the chat model classifies what they leave open, only if it is loaded."""
        chat = self._services.chat
        classify = self._settings.classify_undecided
        decision = decide_route(
            text,
            has_image=has_image,
            chat=chat if classify else None,
            chat_resident=(lambda: chat_model_resident(self._services.manager, chat)) if classify else None,
        )
        log.info("route %s (%s, by %s): %.80r", decision.route, decision.reason, decision.by, text)
        return decision

    def chat(
        self,
        history: Sequence[Message],
        decision: RouteDecision,
        params: GenerationParams | None = None,
        *,
        system_prompt: str | None = None,
        cancel: threading.Event | None = None,
    ) -> TextStream:
        messages = [*history, {"role": "user", "content": decision.prompt}]
        return self._services.chat.stream(messages, params, system_prompt=system_prompt, cancel=cancel)

    def look(
        self,
        image: str | Path | bytes,
        history: Sequence[Message],
        decision: RouteDecision,
        *,
        cancel: threading.Event | None = None,
    ) -> TextStream:
        self._services.vision.require_installed()
        return self._services.vision.stream(
            image, [*history, {"role": "user", "content": decision.prompt}], cancel=cancel
        )

    def image_prompt(self, decision: RouteDecision) -> ImagePrompt:
        """The prompt for the generator: the chat model's rewrite, or the wish itself."""
        missing = self._services.images.availability()
        if missing:  # say so before the chat model spends time on a prompt nobody can draw
            raise ModelMissingError(missing)
        if not decision.prompt.strip():
            raise BadInputError("say what the picture should show")
        if self._settings.interpret_image_prompts:
            return interpret_with_model(decision.prompt, self._services.chat)
        return image_prompt_by_rules(decision.prompt)

    def draw(
        self,
        prompt: ImagePrompt,
        *,
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        request = ImageRequest(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt or None)
        return self._services.images.generate(request, progress=progress, cancel=cancel)
