"""The HTTP server: an OpenAI-compatible API with the Gradio UI mounted at "/".

One process and one port serve the browser UI and the JSON endpoints, over the
same model manager and services. Typed errors become OpenAI-shaped error bodies
with the matching status here, at the edge.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.audit import AuditLog, audit_writer
from api.auth import key_matches, require_api_key
from api.errors import ApiError, api_error_for, error_response
from api.gradio_guard import GradioGuard
from api.guards import BodySizeLimit, HostCheck, allowed_hosts
from api.realtime import add_realtime_route
from api.routes import openai_router
from api.sdapi import sdapi_router
from assistant.dispatch import Assistant
from errors import AppError
from services import Services
from settings import AuditSettings, ServerSettings

log = logging.getLogger(__name__)


def create_app(
    services: Services,
    server: ServerSettings,
    outputs_dir: Path,
    demo: gr.Blocks | None = None,
    assistant: Assistant | None = None,
    audit: AuditSettings | None = None,
    ui_folders: Sequence[Path] = (),
    css: str | None = None,
) -> FastAPI:
    app = FastAPI(title="Enclave", docs_url="/api/docs", redoc_url=None)
    max_body = int(server.max_request_mb * 2**20)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(AppError)
    async def on_app_error(_: Request, error: AppError) -> JSONResponse:
        return error_response(api_error_for(error))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        problem = str(first.get("msg", "bad value")).removeprefix("Value error, ")
        message = f"invalid request: '{where}': {problem}" if where else f"invalid request body: {problem}"
        return error_response(ApiError(400, message, "invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        # Raised by the framework itself (a body over the limit while it is read): OpenAI's shape too.
        code = "request_too_large" if error.status_code == 413 else "invalid_request"
        return error_response(ApiError(error.status_code, str(error.detail), code))

    # Added in reverse of the order they run in: the body-size check comes before the UI's guard,
    # which reads whole bodies of Gradio's API calls.
    app.add_middleware(GradioGuard, server=server)  # the UI's file inputs, login page and login attempts
    app.add_middleware(BodySizeLimit, max_bytes=max_body, limit_mb=server.max_request_mb)
    app.add_middleware(HostCheck, allowed=allowed_hosts(server))
    if audit is not None and audit.enabled:  # added last: runs first, so refusals are recorded too
        app.add_middleware(AuditLog, settings=audit, api_key=server.api_key, writer=audit_writer(audit))

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(Exception)
    async def on_unexpected_error(_: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error while serving a request", exc_info=error)
        message = f"unexpected error ({type(error).__name__}: {error}); the server keeps running, its log has details"
        return error_response(ApiError(500, message, "internal_error", "server_error"))

    @app.get("/api/status", dependencies=[Depends(require_api_key(server))])
    def status() -> dict[str, Any]:
        return dataclasses.asdict(services.manager.status())

    @app.get("/outputs/{day}/{name}", dependencies=[Depends(require_api_key(server))])
    def output_file(day: str, name: str) -> FileResponse:
        """A generated PNG, so API clients and chat links can show it."""
        folder = outputs_dir.resolve()
        path = (folder / day / name).resolve()
        if not path.is_relative_to(folder) or path.suffix != ".png" or not path.is_file():
            raise ApiError(404, f"no generated image {day}/{name}", "not_found")
        return FileResponse(path, media_type="image/png")

    app.include_router(openai_router(services, server, outputs_dir, assistant))
    add_realtime_route(app, services, server)
    app.include_router(sdapi_router(services, server))
    if demo is not None:
        # Generated images live in outputs_dir, saved conversations' images and exports in ui_folders;
        # the UI shows them.
        app = gr.mount_gradio_app(
            app,
            demo,
            path="/",
            footer_links=["settings"],
            allowed_paths=[str(outputs_dir), *map(str, ui_folders)],
            css=css,
            # With an API key the browser UI asks for it too (any user name, the key as password).
            auth=(lambda _user, password: key_matches(password, server.api_key)) if server.api_key else None,
        )
    return app
