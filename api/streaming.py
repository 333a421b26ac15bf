"""Streaming a blocking text stream to an HTTP client as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from api.errors import api_error_for, error_body
from api.protocol import finish_reason_of, usage_of
from errors import AppError
from text_generation.stream import TextStream

log = logging.getLogger(__name__)

_DONE = object()


class PieceRelay:
    """Runs a TextStream in a worker thread and hands its pieces to the event loop.

    Setting ``cancel`` (done when the client goes away) stops generation at the next
    token; the worker then closes the stream, which releases the model.
    """

    def __init__(self, stream: TextStream, cancel: threading.Event) -> None:
        self._stream = stream
        self._cancel = cancel
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        threading.Thread(target=self._produce, name="api-stream", daemon=True).start()

    def _produce(self) -> None:
        try:
            for piece in self._stream:
                self._send(piece)
            self._send(_DONE)
        except BaseException as error:
            self._send(error)
        finally:
            self._stream.close()

    def _send(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the client is long gone
            self._cancel.set()

    async def next(self) -> str | None:
        """The next text: every piece already waiting, joined (fewer events when the client
        lags behind the model); None at the end; raises what the stream raised."""
        item = await self._queue.get()
        if item is _DONE:
            return None
        if isinstance(item, BaseException):
            raise item
        pieces = [item]
        while not self._queue.empty():
            following = self._queue.get_nowait()
            if following is _DONE or isinstance(following, BaseException):
                self._queue.put_nowait(following)  # the queue is empty now: it is next in line again
                break
            pieces.append(following)
        return "".join(pieces)


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_events(
    relay: PieceRelay,
    stream: TextStream,
    cancel: threading.Event,
    completion_id: str,
    first: str | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": stream.model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if include_usage:
            body["usage"] = None
        return body

    try:
        yield sse(chunk({"role": "assistant", "content": ""}))
        piece = first
        while piece is not None:
            yield sse(chunk({"content": piece}))
            piece = await relay.next()
        yield sse(chunk({}, finish_reason_of(stream)))
        if include_usage:
            yield sse({**chunk({}), "choices": [], "usage": usage_of(stream)})
        yield sse("[DONE]")
    except Exception as error:  # after the first piece: report inside the stream, headers are gone
        if not isinstance(error, AppError):
            log.error("unexpected error while streaming", exc_info=error)
        failure = api_error_for(error if isinstance(error, AppError) else AppError(f"unexpected error: {error}"))
        yield sse(error_body(str(failure), failure.error_type, failure.code))
    finally:
        cancel.set()  # the client left or the reply ended: stop generating, release the model
