"""The audit log: one JSON line per request that does something (an API call, a UI action, an
upload, a login attempt), for sites that must account for every use of the models.

Each line: time, client address, whether a valid key came with it, method and endpoint, model and
route taken (when the route says so), duration, status, bytes in and out. Never a key, a cookie or
a password; the prompt text only with ``audit.log_prompts``. Rotated by size.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import key_matches
from settings import AuditSettings

# Requests that use or reveal something; static files, health checks and the UI's own polling are not audited.
AUDITED_PREFIXES = (
    "/v1/",
    "/api/",
    "/outputs/",
    "/login",
    "/gradio_api/call/",
    "/gradio_api/run/",
    "/gradio_api/queue/join",
    "/gradio_api/upload",
)
# What a route may tell the audit log about its request, through request.state.
NOTED_FIELDS = ("model", "route", "prompt")


def audit_writer(settings: AuditSettings) -> logging.Logger:
    """A logger of its own (not in the logging registry, never propagating) writing rotated JSON lines."""
    settings.path.parent.mkdir(parents=True, exist_ok=True)
    writer = logging.Logger("audit")
    handler = logging.handlers.RotatingFileHandler(
        settings.path, maxBytes=int(settings.max_mb * 2**20), backupCount=settings.backups, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    writer.addHandler(handler)
    writer.propagate = False
    return writer


def note(request: Any, **fields: str | None) -> None:
    """Let the audit log know what a route did with its request (model, route, prompt)."""
    for name, value in fields.items():
        setattr(request.state, f"audit_{name}", value)


class AuditLog:
    def __init__(self, app: ASGIApp, settings: AuditSettings, api_key: str | None, writer: logging.Logger) -> None:
        self._app = app
        self._settings = settings
        self._api_key = api_key
        self._writer = writer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(AUDITED_PREFIXES):
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        counts = {"in": 0, "out": 0, "status": 0}
        scope.setdefault("state", {})  # one dict for the whole request: routes note into it, we read it

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                counts["in"] += len(message.get("body", b""))
            return message

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                counts["status"] = message["status"]
            elif message["type"] == "http.response.body":
                counts["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self._app(scope, counted_receive, counted_send)
        finally:
            self._write(scope, counts, time.perf_counter() - started)

    def _write(self, scope: Scope, counts: dict[str, int], seconds: float) -> None:
        state = scope.get("state") or {}
        entry: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "client": (scope.get("client") or ("", 0))[0],
            "authenticated": self._authenticated(scope),
            "method": scope["method"],
            "endpoint": scope["path"],
            "model": state.get("audit_model"),
            "route": state.get("audit_route"),
            "seconds": round(seconds, 3),
            "status": counts["status"] or None,  # None: the client left before an answer
            "bytes_in": counts["in"],
            "bytes_out": counts["out"],
        }
        if self._settings.log_prompts and state.get("audit_prompt") is not None:
            entry["prompt"] = state["audit_prompt"]
        self._writer.info(json.dumps(entry, ensure_ascii=True))

    def _authenticated(self, scope: Scope) -> bool:
        """Whether the request carried the valid key (the key itself is never written)."""
        if not self._api_key:
            return False
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and key_matches(token.strip(), self._api_key)
