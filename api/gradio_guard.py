"""Guards in front of the mounted Gradio UI, for what Gradio itself lets through.

Found in Gradio 6 (mounted with ``gr.mount_gradio_app``, so the Blocks never "launch"):

- **File inputs name any file or URL.** A ``FileData`` in an API call (``/gradio_api/call/*``,
  ``/gradio_api/queue/join``, ``/gradio_api/run/*`` …) whose ``path`` is a URL is downloaded while
  Gradio preprocesses the inputs: the server looks up the host name the client chose and connects
  wherever it resolves. A ``path`` naming a server file (``/etc/passwd``) is copied into Gradio's
  cache, from where the UI hands it back. Checking in the event handler is too late, so the request
  body is checked here, before Gradio sees it: every file object must name a file in Gradio's own
  upload folder (where ``/gradio_api/upload`` stores what a browser sends).
- **The login page describes the whole UI.** With ``auth`` set, Gradio's login page still embeds the
  full API description (``window.gradio_api_info``), whose parameter defaults are the components'
  values: the configured system prompt, default questions, model names. A client that has not
  signed in gets the login page with an empty API description and the bare login config.
- **Unlimited login attempts.** ``/login`` checks the API key as often as it is asked. Failed
  attempts are limited per client address; the limiter belongs to the middleware, not the module.

Plain ASGI middleware: Starlette's BaseHTTPMiddleware would wrap the request's receive channel,
and routes could no longer notice that their client disconnected.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from gradio.routes import App as GradioApp
from gradio.utils import get_upload_folder
from starlette.requests import cookie_parser
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, error_response
from settings import ServerSettings

API_PREFIX = "/gradio_api/"
UPLOAD_ROUTES = frozenset({"/gradio_api/upload", "/gradio_api/process_recording"})  # multipart, Gradio stores it
LOGIN_ROUTES = frozenset({"/login", "/login/"})
FILE_DATA_TYPE = "gradio.FileData"
MAX_PAGE_BYTES = 8 * 2**20  # a login page is a few kB; anything larger is not one
EMPTY_API_INFO: dict[str, Any] = {"named_endpoints": {}, "unnamed_endpoints": {}}

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")  # "http:", "file:", "data:" … at the start of a string
_FILE_ROUTE = re.compile(r"/gradio_api/file=(.+)")  # how Gradio's client refers to an uploaded file


# -- file inputs -------------------------------------------------------------------------


def upload_folder() -> Path:
    """Where Gradio stores uploads and its cache: the function Gradio itself asks."""
    return Path(get_upload_folder()).resolve()


def is_uploaded(path: str, folder: Path) -> bool:
    """True when ``path`` is a local path strictly inside ``folder``, symbolic links followed."""
    if not path or "\x00" in path or _SCHEME.match(path) or path.startswith("//"):
        return False
    try:
        resolved = Path(os.path.abspath(path)).resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return resolved != folder and resolved.is_relative_to(folder)


def is_file_object(value: dict[str, Any]) -> bool:
    meta = value.get("meta")
    return "path" in value or "url" in value or (isinstance(meta, dict) and meta.get("_type") == FILE_DATA_TYPE)


def file_refusal(file: dict[str, Any], folder: Path) -> str | None:
    """Why a file object may not be used (None: it names an upload).

    ``path`` must name a file in the upload folder. ``url`` may only be the way Gradio's own client
    refers to such a file (``<root>/gradio_api/file=<path>``): Gradio does not fetch an input's url,
    but any other value is a URL a client wants the server to use.
    """
    path, url = file.get("path"), file.get("url")
    if path is None and not url:
        return "a file input names no file" if file.get("meta") else None
    if path is not None and (not isinstance(path, str) or not is_uploaded(path, folder)):
        if isinstance(path, str) and (_SCHEME.match(path) or path.startswith("//")):
            return "a file input is a URL; this server fetches nothing: upload the file instead"
        return "a file input names a file this server did not receive as an upload: upload the file instead"
    if url:
        route = _FILE_ROUTE.search(urlsplit(url).path) if isinstance(url, str) else None
        if route is None or not is_uploaded(unquote(route.group(1)), folder):
            return "a file input's url is not an uploaded file of this server; this server fetches nothing"
    return None


def find_file_refusal(data: Any, folder: Path) -> str | None:
    """Walk decoded JSON (without recursion: nesting depth is the client's choice) for a file
    object that may not be used; the first reason found, or None."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if is_file_object(value):
                reason = file_refusal(value, folder)
                if reason is not None:
                    return reason
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return None


# -- login attempts ----------------------------------------------------------------------


class LoginLimiter:
    """At most ``max_failures`` failed logins per client in any ``window_s`` seconds.

    Every attempt counts as failed from the moment it starts (so a burst of parallel attempts
    cannot slip past the count) until it succeeds; a success forgets the client's failures.
    At most ``max_clients`` clients are remembered; the oldest are forgotten first.
    """

    def __init__(
        self,
        max_failures: int = 10,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0: now."""
        failures = self._recent(client)
        if failures is None or len(failures) < self.max_failures:
            return 0.0
        return max(failures[-self.max_failures] + self.window_s - self._clock(), 0.0)

    def attempt(self, client: str) -> None:
        failures = self._recent(client)
        if failures is None:
            self._make_room()
            failures = self._failures[client] = deque(maxlen=self.max_failures)
        failures.append(self._clock())

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    def _recent(self, client: str) -> deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        while failures and failures[0] <= self._clock() - self.window_s:
            failures.popleft()
        return failures

    def _make_room(self) -> None:
        if len(self._failures) < self._max_clients:
            return
        now = self._clock()
        for client in [c for c, f in self._failures.items() if not f or f[-1] <= now - self.window_s]:
            del self._failures[client]
        while len(self._failures) >= self._max_clients:
            del self._failures[next(iter(self._failures))]


def client_key(scope: Scope) -> str:
    """The client's address; an IPv6 client by its /64 network, which one machine usually holds whole."""
    host = (scope.get("client") or ("unknown", 0))[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


# -- the login page ----------------------------------------------------------------------


def script_json(value: Any) -> str:
    """JSON to place inside <script>, escaped as Gradio's own template filter does."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027")


def replace_script_value(html: str, variable: str, make: Callable[[Any], Any]) -> str:
    """Replace ``<script>window.<variable> = JSON;</script>`` with ``make(JSON decoded or None)``."""
    start_marker = f"<script>window.{variable} = "
    start = html.find(start_marker)
    if start < 0:
        return html
    value_start = start + len(start_marker)
    end = html.find("</script>", value_start)
    if end < 0:  # unterminated: drop the rest rather than guess
        return html[:start]
    try:
        old = json.loads(html[value_start:end].rstrip().removesuffix(";"))
    except ValueError:
        old = None
    return f"{html[:value_start]}{script_json(make(old))};{html[end:]}"


def login_config(config: Any) -> dict[str, Any]:
    """What Gradio's login form needs (the config Gradio builds for it), nothing of the UI."""
    config = config if isinstance(config, dict) else {}
    return {
        "auth_required": True,
        "auth_message": config.get("auth_message") if isinstance(config.get("auth_message"), str) else None,
        "space_id": None,
        "root": config.get("root") if isinstance(config.get("root"), str) else None,
        "page": {"": {"layout": {}}},
        "pages": [""],
        "components": [],
        "dependencies": [],
        "current_page": "",
    }


def login_page_only(html: str) -> str:
    """A Gradio page as a client that has not signed in may see it: the login form's config, no API."""
    html = replace_script_value(html, "gradio_config", login_config)
    return replace_script_value(html, "gradio_api_info", lambda _old: EMPTY_API_INFO)


def mounted_gradio(app: Any) -> GradioApp | None:
    for route in getattr(app, "routes", ()):
        if isinstance(route, Mount) and isinstance(route.app, GradioApp):
            return route.app
    return None


def signed_in(scope: Scope, gradio: GradioApp | None) -> bool:
    """Whether the request carries a token Gradio's /login handed out (Gradio's own test)."""
    if gradio is None:
        return False
    header = next((value for name, value in scope["headers"] if name == b"cookie"), b"")
    cookies = cookie_parser(header.decode("latin-1"))
    token = cookies.get(f"access-token-{gradio.cookie_id}") or cookies.get(f"access-token-unsecure-{gradio.cookie_id}")
    return token is not None and gradio.tokens.get(token) is not None


# -- the middleware ----------------------------------------------------------------------


def route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def refuse(scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
    await error_response(error)(scope, receive, send)


class GradioGuard:
    """Checks file inputs in Gradio's API calls, keeps the UI's description from clients that have
    not signed in, and limits failed logins per client address."""

    def __init__(self, app: ASGIApp, server: ServerSettings, limiter: LoginLimiter | None = None) -> None:
        self._app = app
        self._login_required = bool(server.api_key)  # the UI asks for the key only when one is set
        self.limiter = limiter or LoginLimiter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path, method = route_path(scope), scope["method"]
        if path.startswith(API_PREFIX) and method in ("POST", "PUT", "PATCH") and path not in UPLOAD_ROUTES:
            await self._check_files(scope, receive, send)
        elif self._login_required and path in LOGIN_ROUTES and method == "POST":
            await self._limit_login(scope, receive, send)
        elif self._login_required and method == "GET" and not signed_in(scope, mounted_gradio(scope.get("app"))):
            await self._login_page_only(scope, receive, send)
        else:
            await self._app(scope, receive, send)

    async def _check_files(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the body, refuse it if it names a file that is not an upload, then hand the same
        bytes on. The size limit is the body-size check's, around this middleware: it stops the
        reading as soon as the bytes pass the limit."""
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nothing to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body.strip():
            try:
                decoded = json.loads(body)
            except (ValueError, RecursionError):
                await refuse(scope, receive, send, ApiError(400, "the request body is not valid JSON", "invalid_json"))
                return
            reason = find_file_refusal(decoded, upload_folder())
            if reason is not None:
                await refuse(scope, receive, send, ApiError(400, reason, "invalid_file"))
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later messages (a disconnect) come from the client
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._app(scope, replay, send)

    async def _limit_login(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = client_key(scope)
        wait = self.limiter.retry_after(client)
        if wait > 0:
            seconds = math.ceil(wait)
            message = f"too many failed logins from this address; try again in {seconds} s"
            headers = {"Retry-After": str(seconds)}
            await refuse(scope, receive, send, ApiError(429, message, "too_many_login_attempts", headers=headers))
            return
        self.limiter.attempt(client)

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                self.limiter.succeeded(client)
            await send(message)

        await self._app(scope, receive, watched_send)

    async def _login_page_only(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on uncompressed; rewrite an HTML answer to the login page only."""
        headers = [(name, value) for name, value in scope["headers"] if name != b"accept-encoding"]
        scope = {**scope, "headers": headers}
        start: Message | None = None
        chunks: list[bytes] = []
        size = 0

        async def rewriting_send(message: Message) -> None:
            nonlocal start, size
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if not content_type.startswith(b"text/html"):
                    await send(message)
                    return
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_PAGE_BYTES:
                raise RuntimeError("an HTML page for a client that has not signed in is too large to check")
            if message.get("more_body", False):
                return
            await self._send_login_page(start, b"".join(chunks), send)

        await self._app(scope, receive, rewriting_send)

    @staticmethod
    async def _send_login_page(start: Message, body: bytes, send: Send) -> None:
        headers = dict(start.get("headers", []))
        if headers.get(b"content-encoding", b"identity") != b"identity":
            raise RuntimeError("an HTML page for a client that has not signed in came compressed")
        page = login_page_only(body.decode("utf-8", "replace")).encode("utf-8")
        kept = [(n, v) for n, v in start.get("headers", []) if n not in (b"content-length", b"etag")]
        await send({**start, "headers": [*kept, (b"content-length", str(len(page)).encode())]})
        await send({"type": "http.response.body", "body": page, "more_body": False})
