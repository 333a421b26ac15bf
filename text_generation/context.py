"""Fitting a conversation into a model's context window: drop the oldest turns, keep the
system prompt and the last message, shorten the reply only as a last resort."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from errors import BadInputError
from text_generation.stream import Message

MIN_REPLY_TOKENS = 16


@dataclass(frozen=True)
class FittedPrompt:
    tokens: list[int]
    stop: list[str]
    max_tokens: int
    dropped_messages: int


def fit_to_context(
    tokens_for: Callable[[Sequence[Message]], tuple[list[int], list[str]]],
    system: Message | None,
    turns: Sequence[Message],
    context_size: int,
    max_tokens: int,
) -> FittedPrompt:
    """Drop the oldest turns (never the system prompt or the last message) until the
    prompt plus a full reply fits; if only the last message is left, shorten the reply;
    if even that cannot fit, refuse with the numbers."""
    start = 0
    while True:
        kept = list(turns[start:])
        tokens, stop = tokens_for(([system] if system else []) + kept)
        if len(tokens) + max_tokens <= context_size:
            return FittedPrompt(tokens, stop, max_tokens, start)
        if len(kept) > 1:
            start += 1
            # a conversation resumes at a user turn
            while start < len(turns) - 1 and turns[start]["role"] != "user":
                start += 1
            continue
        room = context_size - len(tokens)
        if room >= MIN_REPLY_TOKENS:
            return FittedPrompt(tokens, stop, room, start)
        raise BadInputError(
            f"the message is {len(tokens)} tokens with the system prompt, and the model's context "
            f"holds {context_size}; shorten the message or raise chat.context_size in config.yaml"
        )


# ----------------------------------------------------------------------------
# The service
# ----------------------------------------------------------------------------
