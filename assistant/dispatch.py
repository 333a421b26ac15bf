"""One conversation that chats, looks at images and draws.

The assistant decides where a message goes (``routing``), then hands it to the chat
model, the vision model or the image generator. Every front end that routes (the Chat
tab, the API's model "auto") calls ``Assistant.answer`` and shows the decision and its
reason next to the answer; every decision is logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from assistant.routing import ImagePrompt, RouteDecision, decide_route, image_prompt_by_rules
from assistant.routing import interpret_image_request as interpret_with_model
from errors import BadInputError, ModelMissingError, TooLargeError
from generator import GenerationResult, ImageRequest
from media.images import ImageSource
from services import Services
from settings import AssistantSettings
from text_generation.stream import Message, TextStream

log = logging.getLogger(__name__)

DESTINATIONS = {"chat": "chat model", "vision": "vision model", "image": "image generator"}


def route_title(decision: RouteDecision) -> str:
    """The line shown above a routed answer: "→ image generator: asked to draw"."""
    return f"→ {DESTINATIONS[decision.route]}: {decision.reason}"


@dataclass(frozen=True)
class Drawing:
    prompt: ImagePrompt
    result: GenerationResult


@dataclass
class PendingDrawing:
    """A picture the assistant decided to draw: first its prompt (shown to the user), then the drawing."""

    _assistant: Assistant
    decision: RouteDecision
    cancel: threading.Event | None
    _prompt: ImagePrompt | None = field(default=None, init=False)

    def prompt(self) -> ImagePrompt:
        if self._prompt is None:
            self._prompt = self._assistant.image_prompt(self.decision)
        return self._prompt

    def draw(self, progress: Callable[[int, int], None] | None = None) -> Drawing:
        prompt = self.prompt()
        return Drawing(prompt, self._assistant.draw(prompt, progress=progress, cancel=self.cancel))


@dataclass(frozen=True)
class Answer:
    """Where a message went, and the work that answers it: a text stream, a drawing, or only the hint."""

    decision: RouteDecision
    text: TextStream | None = None
    drawing: PendingDrawing | None = None

    @property
    def hint_only(self) -> bool:
        return self.text is None and self.drawing is None


class Assistant:
    def __init__(self, services: Services, settings: AssistantSettings) -> None:
        self._services = services
        self._settings = settings

    def decide(self, text: str, *, has_image: bool) -> RouteDecision:
        """Rules first; the chat model classifies what they leave open, only if it is loaded and idle."""
        model = self._services.chat if self._settings.classify_undecided else None
        decision = decide_route(text, has_image=has_image, model=model)
        log.info("route %s (%s, by %s): %.80r", decision.route, decision.reason, decision.by, text)
        return decision

    def answer(
        self,
        text: str,
        *,
        image: ImageSource | None = None,
        history: Sequence[Message] = (),
        overrides: Mapping[str, Any] | None = None,
        system_prompt: str | None = None,
        grammar: str | None = None,
        cancel: threading.Event | None = None,
    ) -> Answer:
        """Route ``text`` (about ``image``, when the conversation has one) and start the answer.

        ``overrides`` are sampling values (temperature, top_p, max_tokens, seed, stop; None keeps
        the default) for whichever model answers. Inputs are checked now; models load when the
        text stream is read or the drawing is drawn.
        """
        limit = self._services.chat.max_message_chars
        if len(text) > limit:  # before the rules or any model read it: their work must not grow with it
            raise TooLargeError(
                f"the message is {len(text):,} characters; the limit is {limit:,} "
                "(chat.max_message_chars in config.yaml). Shorten it or split it into parts."
            )
        decision = self.decide(text, has_image=image is not None)
        if decision.hint and not decision.prompt.strip() and decision.route != "vision":
            return Answer(decision)  # only a hint to show: nothing to answer
        if decision.route == "image":
            return Answer(decision, drawing=PendingDrawing(self, decision, cancel))
        messages = [*history, {"role": "user", "content": decision.prompt}]
        values = dict(overrides or {})
        if decision.route == "vision":
            if grammar is not None:
                raise BadInputError("response_format is supported for text chat only, not for questions about images")
            vision = self._services.vision
            vision.require_installed()
            params = vision.defaults.override(**values)
            return Answer(decision, text=vision.stream(image or b"", messages, params, cancel=cancel))
        chat = self._services.chat
        params = chat.defaults.override(**values)
        stream = chat.stream(messages, params, system_prompt=system_prompt, cancel=cancel, grammar=grammar)
        return Answer(decision, text=stream)

    def image_prompt(self, decision: RouteDecision) -> ImagePrompt:
        """The prompt for the generator: the chat model's rewrite when it is loaded and idle, else the rules'."""
        missing = self._services.images.availability()
        if missing:  # say so before any work on a prompt nobody can draw
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
