"""Checks every HTTP request meets before any route sees it: the Host it names, and the size of its body.

Plain ASGI middlewares: Starlette's BaseHTTPMiddleware would wrap the request's receive channel, and
routes could no longer notice that their client disconnected.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, error_response
from settings import LOOPBACK_NAMES, ServerSettings

CLOSE = {"Connection": "close"}


class BodyTooLargeError(HTTPException):
    """Raised while a body is read, when it passes the limit: frameworks pass HTTPExceptions on."""

    def __init__(self, limit_mb: float) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit_mb:g} MB (server.max_request_mb)")


class BodySizeLimit:
    """A body over the limit is refused: at once when its declared length says so, and otherwise
    (a chunked body, or a length that lies) as soon as the bytes read pass the limit, before more
    is read or stored. Gradio's uploads pass through here too."""

    def __init__(self, app: ASGIApp, max_bytes: int, limit_mb: float) -> None:
        self._app = app
        self._max_bytes = max_bytes
        self._limit_mb = limit_mb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self._max_bytes:
            message = f"the request is {int(length) / 2**20:.1f} MB; the limit is {self._limit_mb:g} MB"
            refusal = ApiError(413, message + " (server.max_request_mb)", "request_too_large", headers=CLOSE)
            await error_response(refusal)(scope, receive, send)
            return
        received = 0
        started = exceeded = False

        async def counted_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_bytes:
                    exceeded = True
                    raise BodyTooLargeError(self._limit_mb)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if exceeded:  # whoever words the refusal: close the connection, read no more of the body
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self._app(scope, counted_receive, watched_send)
        except BodyTooLargeError as error:  # no route turned it into a response
            if not started:
                refusal = ApiError(413, str(error.detail), "request_too_large", headers=CLOSE)
                await error_response(refusal)(scope, receive, send)


def allowed_hosts(server: ServerSettings) -> frozenset[str] | None:
    """The names a client may put in the Host header; None: any.

    A server on loopback answers only to loopback names (and server.allowed_hosts), so a web page
    elsewhere cannot reach it through a DNS name it rebinds to 127.0.0.1.
    """
    configured = {name.lower() for name in server.allowed_hosts}
    if server.is_loopback:
        return frozenset(configured | LOOPBACK_NAMES | {server.host.lower()})
    if configured:
        return frozenset(configured | {server.host.lower()})
    return None


def host_name(header: bytes) -> str:
    """The name in a Host header, without its port: "[::1]:7860" -> "::1", "Example.org:80" -> "example.org"."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class HostCheck:
    """Answers only requests whose Host header names this server."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str] | None) -> None:
        self._app = app
        self._allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._allowed is None or scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"host", b"")
        if host_name(header) in self._allowed:
            await self._app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        message = "the Host header does not name this server; add the name to server.allowed_hosts to use it"
        await error_response(ApiError(400, message, "invalid_host"))(scope, receive, send)
