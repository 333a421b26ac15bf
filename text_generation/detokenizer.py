"""Streaming a transformers ``generate`` cheaply: token ids handed over in batches, text decoded
incrementally.

transformers' own text streamer decodes every token's whole line again and wakes the consumer
once per token; on a small model that cost most of the speed. Here the generating thread only
appends ids (``TokenHandOff.put``), the consumer takes whatever has piled up since it last looked,
and ``IncrementalDetokenizer`` decodes a short window of recent tokens, not the whole answer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

INCOMPLETE = "\ufffd"  # what decoding gives for a character whose bytes are split across tokens


class IncrementalDetokenizer:
    """The text of a growing token sequence, piece by piece.

    Each call decodes only the tokens since the piece before last: decoding that window with and
    without the new tokens and keeping the difference gets spaces and multi-byte characters right
    for byte-level and SentencePiece tokenizers alike (a lone token may decode without its space).
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # the window decoded for context begins here
        self._done = 0  # tokens up to here are already in the text given out

    def add(self, ids: Sequence[int]) -> str:
        """The new text that ``ids`` complete (empty while a character is still incomplete)."""
        self._ids.extend(ids)
        before = self._decode(self._ids[self._start : self._done])
        after = self._decode(self._ids[self._start :])
        if after.endswith(INCOMPLETE) or len(after) <= len(before):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return after[len(before) :]

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False)


class TokenHandOff:
    """A ``generate`` streamer: the generating thread appends new token ids; the consumer takes
    them in batches of whatever arrived while it was busy.

    The first token is handed over at once; after it the consumer is woken for every
    ``BATCH_TOKENS`` tokens or after ``BATCH_SECONDS``, whichever comes first. Each wake-up takes a
    core from the model's threads (with as many OpenMP threads as cores, the whole team then waits
    at its next barrier): measured on two cores, waking for every token cost 10-20 % of LLaVA's
    speed. Ten updates a second read as smoothly as a hundred."""

    BATCH_TOKENS = 8
    BATCH_SECONDS = 0.1

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._ended = False
        self._prompt_seen = False
        self._wanted = 1  # the consumer is woken once this many ids are there
        self._changed = threading.Condition()

    def put(self, value: Any) -> None:  # called by generate: first the prompt, then each new token
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        with self._changed:
            self._ids.extend(ids)
            if len(self._ids) >= self._wanted:
                self._changed.notify()

    def end(self) -> None:
        with self._changed:
            self._ended = True
            self._changed.notify()

    def batches(self) -> Iterator[list[int]]:
        """The new token ids since the last batch, until ``end``."""
        taken = 0
        while True:
            with self._changed:
                self._wanted = taken + (1 if taken == 0 else self.BATCH_TOKENS)
                if len(self._ids) < self._wanted and not self._ended:
                    self._changed.wait(None if taken == 0 else self.BATCH_SECONDS)
                self._wanted = taken + 1  # slow tokens: each one as soon as it comes
                while len(self._ids) == taken and not self._ended:
                    self._changed.wait()
                batch, ended = self._ids[taken:], self._ended
                taken = len(self._ids)
            if batch:
                yield batch
            elif ended:
                return
