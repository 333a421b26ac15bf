"""Hostile text through the router: whitespace runs, lone surrogates, control characters, 1 MB
strings, long runs of punctuation and of drawing words. Every call ends in time bounded by a
normal message's (a ratio measured in the same test, with a small floor for timer noise) and
raises nothing but the typed errors of ``errors.py``; ``Assistant.answer`` refuses a message over
the configured limit before the router sees it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import assistant.routing as routing
from assistant.dispatch import Assistant
from assistant.routing import (
    ImagePrompt,
    RouteDecision,
    decide_route,
    image_prompt_by_rules,
    interpret_image_request,
    route_message,
)
from errors import AppError, TooLargeError
from main import build_services
from services import Services
from settings import load_settings
from tests.conftest import write_config
from text_generation.stream import GenerationParams, Message

NORMAL = "Hi! Could you please draw a dragon flying over a castle at dusk? Make it orange."
RATIO = 50  # a hostile call may take this many times a normal one ...
FLOOR_S = 0.05  # ... plus this, for timer noise and a busy machine
LIMIT = 20_000  # chat.max_message_chars in the Assistant tests' config


def hostile_messages() -> Iterator[tuple[str, str]]:
    """(name, text): the shapes that make regular expressions backtrack, and plain huge input."""
    yield "spaces 32k", "a" + " " * 32_000 + "b"
    yield "spaces 64k", "a" + " " * 64_000 + "b"
    yield "tabs", "a" + "\t" * 32_000 + "b"
    yield "newline space newline", "\n \n" * 10_000
    yield "mixed whitespace", "x" + " \t\n\r\f\v\u00a0\u2028\u3000" * 4_000 + "y"
    yield "unicode spaces", "draw" + "\u3000" * 32_000 + "a cat"
    yield "draw then spaces", "draw a cat" + " " * 32_000 + "x"
    yield "command then spaces", "/draw" + " " * 32_000 + "x"
    yield "can you then spaces", "can you" + " " * 32_000 + "x"
    yield "kannst du then spaces", "kannst du " + " " * 32_000 + "x zeichnen"
    yield "kannst du then words", "kannst du mir " + "einen " * 6_000 + "x"
    yield "question marks", "draw a cat" + "?" * 40 + "x"
    yield "punctuation", ".!?;" * 25_000
    yield "punctuation after a request", "draw a cat" + ".!?;:" * 8_000 + "x"
    yield "commas", "draw a cat" + ", " * 16_000 + "x"
    yield "comma question", "draw a cat" + ", ?" * 10_000 + "x"
    yield "please question", "draw a cat please?" * 2_000 + "x"
    yield "draw repeated", "draw " * 100_000
    yield "paint repeated", "paint " * 10_000 + "with words"
    yield "illustrate repeated", "illustrate " * 6_000 + "with examples"
    yield "render repeated", "render " * 10_000
    yield "stell dir repeated", "stell dir " * 6_000
    yield "adjectives", "make " + "red " * 16_000 + "x"
    yield "german adjectives", "erstelle ein " + "rotes " * 10_000 + "x"
    yield "greetings", "hi, " * 16_000 + "can you draw"
    yield "lora openings", "<lora:" * 10_000
    yield "code fences", "```" * 10_000
    yield "1 MB of one character", "a" * 1_000_000
    yield "1 MB of spaces", " " * 1_000_000
    yield "lone surrogate", "\ud800"
    yield "lone surrogates", "draw a \ud800 cat " + "\udfff" * 10_000
    yield "control characters", "".join(map(chr, range(32))) * 1_000
    yield "nul bytes", "draw " + "\x00" * 100_000


HOSTILE = list(hostile_messages())


class _BusyModel:
    """A chat model that is never idle: classifying and rewriting fall back to the rules."""

    def complete_if_idle(
        self, messages: Sequence[Message], params: GenerationParams, *, grammar: str | None = None
    ) -> str | None:
        return None


def _timed(call: Callable[[], object]) -> tuple[float, object]:
    """Seconds and result of one call; a typed error of the app counts as an answer, anything else fails."""
    start = time.perf_counter()
    try:
        result: object = call()
    except AppError as error:
        result = error
    return time.perf_counter() - start, result


def _best_of_three(call: Callable[[], object], budget: float) -> float:
    """The shortest of up to three runs: a second try only when the first was over budget, but not
    by far (a machine busy for a moment); a slow algorithm is slow every time."""
    best = float("inf")
    for _ in range(3):
        best = min(best, _timed(call)[0])
        if best <= budget or best > 10 * budget:
            break
    return best


def _budget(call: Callable[[], object]) -> float:
    """RATIO times the median of 20 calls on a normal message, plus FLOOR_S."""
    call()  # warm up
    return RATIO * statistics.median(_timed(call)[0] for _ in range(20)) + FLOOR_S


ROUTER_CALLS: dict[str, Callable[[str], object]] = {
    "route_message": route_message,
    "route_message with an image": lambda text: route_message(text, has_image=True),
    "decide_route": decide_route,
    "decide_route with a busy model": lambda text: decide_route(text, model=_BusyModel()),
    "image_prompt_by_rules": image_prompt_by_rules,
    "interpret_image_request with a busy model": lambda text: interpret_image_request(text, _BusyModel()),
}
RESULT_TYPES: dict[str, tuple[type, ...]] = {
    "route_message": (RouteDecision, type(None)),
    "route_message with an image": (RouteDecision,),
    "decide_route": (RouteDecision,),
    "decide_route with a busy model": (RouteDecision,),
    "image_prompt_by_rules": (ImagePrompt,),
    "interpret_image_request with a busy model": (ImagePrompt, AppError),
}


def test_the_hostile_messages_are_what_they_say() -> None:
    """The generator itself: the sizes the test claims, written out, not derived."""
    sizes = dict((name, len(text)) for name, text in HOSTILE)
    assert sizes["spaces 32k"] == 32_002 and sizes["spaces 64k"] == 64_002
    assert sizes["newline space newline"] == 30_000
    assert sizes["1 MB of one character"] == 1_000_000 and sizes["draw repeated"] == 500_000
    assert dict(HOSTILE)["lone surrogate"] == "\ud800"


@pytest.mark.parametrize(("name", "text"), HOSTILE, ids=[name for name, _ in HOSTILE])
def test_the_router_is_quick_and_calm_on_hostile_text(name: str, text: str) -> None:
    slow: list[str] = []
    for call_name, call in ROUTER_CALLS.items():
        budget = _budget(partial(call, NORMAL))
        seconds, result = _timed(partial(call, text))
        assert isinstance(result, RESULT_TYPES[call_name]), f"{call_name}: {result!r}"
        if seconds > budget:
            seconds = min(seconds, _best_of_three(partial(call, text), budget))
        if seconds > budget:
            slow.append(f"{call_name}: {seconds:.3f} s, budget {budget:.3f} s")
    assert not slow, f"{name} ({len(text):,} characters): " + "; ".join(slow)


def test_a_long_message_still_routes_by_its_start_and_its_end() -> None:
    """The router reads a bounded part of a long message, but the request at either end still counts."""
    filler = "This is a long story about my weekend at the lake. " * 400  # about 20,000 characters
    assert route_message("Draw a cat on a boat. " + filler).route == "image"  # type: ignore[union-attr]
    assert route_message(filler + "Now draw a cat on a boat.").route == "image"  # type: ignore[union-attr]
    assert route_message(filler).route == "chat"  # type: ignore[union-attr]
    assert image_prompt_by_rules("draw a cat on a boat" + "?" * 40).prompt == "a cat on a boat"
    assert image_prompt_by_rules("draw a cat on a boat, please, thanks!!").prompt == "a cat on a boat"


WHITESPACE = " \t\n\r\x0b\x0c\u00a0\u2028\u3000"
PUNCTUATION = ".!?;:,"
TOKENS = (
    "draw ", "paint ", "a cat ", "picture of ", "kannst du ", "zeichnen", "please", "bitte", "with words",
    "how do I ", "<lora:x:1>", "/draw ", "/chat", "```", "\ud800", "\x00", "\x1b",
)  # fmt: skip
hostile_text = st.lists(
    st.one_of(
        st.text(alphabet=WHITESPACE, max_size=200),
        st.text(alphabet=PUNCTUATION + WHITESPACE, max_size=50),
        st.sampled_from(TOKENS),
        st.text(alphabet=st.characters(exclude_categories=()), max_size=20),  # surrogates and controls too
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_text, st.booleans())
def test_route_message_never_raises(text: str, has_image: bool) -> None:
    decision = route_message(text, has_image=has_image)
    assert decision is None or isinstance(decision, RouteDecision)
    assert isinstance(image_prompt_by_rules(text), ImagePrompt)


# ----------------------------------------------------------------------------
# Assistant.answer: the length check comes before any text processing
# ----------------------------------------------------------------------------


@pytest.fixture()
def services(tmp_path: Path) -> Iterator[Services]:
    config = write_config(tmp_path, chat={"max_message_chars": LIMIT, "defaults": {"max_tokens": 8}})
    services = build_services(load_settings(config))
    yield services
    services.manager.close()


@pytest.fixture()
def routed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Spies on ``Assistant.decide`` and the router: the names of what ran, in order."""
    calls: list[str] = []
    decide, route = Assistant.decide, routing.route_message

    def spy_decide(self: Assistant, text: str, *, has_image: bool) -> RouteDecision:
        calls.append("decide")
        return decide(self, text, has_image=has_image)

    def spy_route(text: str, *, has_image: bool = False) -> RouteDecision | None:
        calls.append("route_message")
        return route(text, has_image=has_image)

    monkeypatch.setattr(Assistant, "decide", spy_decide)
    monkeypatch.setattr(routing, "route_message", spy_route)
    return calls


@pytest.mark.parametrize(
    "text",
    [
        "a" + " " * LIMIT + "b",
        "x" * (LIMIT + 1),
        "draw " * 100_000,
        "\n \n" * 10_000,
        "a" * 1_000_000,
    ],
    ids=["spaces", "one over", "draw repeated", "newline space newline", "1 MB"],
)
def test_a_message_over_the_limit_is_refused_before_routing(services: Services, routed: list[str], text: str) -> None:
    assistant = Assistant(services, load_settings(None).assistant)
    with pytest.raises(TooLargeError, match=r"the limit is 20,000 .*max_message_chars"):
        assistant.answer(text)
    assert routed == []  # neither decide nor the router saw it
    assert services.manager.status().load_counts == {}  # and no model was loaded for it


def test_a_message_at_the_limit_is_routed_quickly(services: Services, routed: list[str]) -> None:
    assistant = Assistant(services, load_settings(None).assistant)

    def answer(text: str) -> object:
        result = assistant.answer(text)
        if result.text is not None:
            result.text.close()
        return result

    budget = _budget(lambda: answer("Hello there!"))
    routed.clear()
    text = "a" + " " * (LIMIT - 2) + "b"  # exactly 20,000 characters
    seconds, result = _timed(lambda: answer(text))
    assert routed == ["decide", "route_message"]  # the spies see what gets through
    assert not isinstance(result, AppError), result
    assert result.decision.route == "chat"  # type: ignore[attr-defined]
    if seconds > budget:
        seconds = min(seconds, _best_of_three(lambda: answer(text), budget))
    assert seconds <= budget, f"{seconds:.3f} s, budget {budget:.3f} s"
