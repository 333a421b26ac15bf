"""What the text-producing services (chat, vision) share: sampling parameters and the
stream of text pieces they return."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from errors import BadInputError
from settings import GenerationDefaults

MAX_SEED = 2**32 - 2  # 2**32 - 1 is llama.cpp's "random"
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512
    seed: int = -1  # -1: a fresh random seed per request (reported back)
    repeat_penalty: float = 1.1
    stop: tuple[str, ...] = ()

    @classmethod
    def from_defaults(cls, defaults: GenerationDefaults) -> GenerationParams:
        return cls(
            temperature=defaults.temperature,
            top_p=defaults.top_p,
            max_tokens=defaults.max_tokens,
            seed=defaults.seed,
            repeat_penalty=defaults.repeat_penalty,
        )

    def override(self, **values: Any) -> GenerationParams:
        """A copy with the given values (None means keep), checked."""
        chosen = {k: v for k, v in values.items() if v is not None}
        if "stop" in chosen:
            stop = chosen["stop"]
            chosen["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        params = replace(self, **chosen)
        params.check()
        return params

    def check(self) -> None:
        if not 0 <= self.temperature <= 2:
            raise BadInputError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BadInputError(f"top_p must be above 0 and at most 1, got {self.top_p}")
        if not 0.5 <= self.repeat_penalty <= 2:
            raise BadInputError(f"repeat_penalty must be between 0.5 and 2, got {self.repeat_penalty}")
        if self.max_tokens < 1:
            raise BadInputError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not -1 <= self.seed <= MAX_SEED:  # llama.cpp takes a 32-bit seed
            raise BadInputError(f"seed must be -1 (random) or a whole number from 0 to {MAX_SEED}, got {self.seed}")


class TextStream:
    """An iterator of text pieces; after it ends, it tells how the reply went."""

    def __init__(self, pieces: Callable[[TextStream], Iterator[str]]) -> None:
        self._pieces = pieces(self)
        self.model_name = ""
        self.device = ""  # where it was generated: "cuda", or "cpu" (also while the GPU was busy)
        self.seed = -1
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.dropped_messages = 0
        self.finish_reason: str | None = None  # "stop", "length" or "cancelled"

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def close(self) -> None:
        self._pieces.close()

    def text(self) -> str:
        return "".join(self)
