"""The services' typed errors as OpenAI-shaped error bodies with the matching HTTP status."""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

from errors import (
    AppError,
    BadInputError,
    BusyError,
    ModelLoadError,
    ModelMissingError,
    ModelTooLargeError,
    OutOfMemoryError,
    RequestCancelledError,
    TooLargeError,
)

RETRY_AFTER_S = 5


class ApiError(Exception):
    """An error with its HTTP status, already worded for the client."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        error_type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.error_type = error_type
        self.headers = headers or {}


MAX_MESSAGE_CHARS = 2000  # messages may repeat what a client sent; a client may send megabytes


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": client_safe(message), "type": error_type, "param": param, "code": code}}


def client_safe(message: str) -> str:
    """An error message as a client may see it: bounded, valid UTF-8, without the server's folders."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "…"
    return redact_paths(message.encode("utf-8", "replace").decode("utf-8"))


# An absolute path of three or more parts. Each part starts after a "/" and cannot contain one,
# so the match is linear in the message's length.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/[^\s/'\"`(),;]+){3,}")


def redact_paths(message: str) -> str:
    """Messages are written for the server's log too; a client sees no more of a path than
    its last two parts ("models/mistral.gguf"), never where the server keeps its files."""
    return _ABSOLUTE_PATH.sub(lambda match: "/".join(match.group(0).rsplit("/", 2)[-2:]), message)


def api_error_for(error: AppError) -> ApiError:
    """Map the services' typed errors to HTTP statuses."""
    message = str(error)
    if isinstance(error, TooLargeError):
        return ApiError(413, message, "request_too_large")
    if isinstance(error, BadInputError):
        return ApiError(400, message, "invalid_request")
    if isinstance(error, ModelMissingError):
        return ApiError(404, message, "model_not_found")
    if isinstance(error, ModelTooLargeError):  # configuration: retrying cannot help
        return ApiError(400, message, "model_too_large")
    if isinstance(error, RequestCancelledError):
        return ApiError(499, message, "request_cancelled")
    if isinstance(error, BusyError | OutOfMemoryError):
        return ApiError(503, message, "model_unavailable", "server_error")
    if isinstance(error, ModelLoadError):
        return ApiError(500, message, "model_load_failed", "server_error")
    return ApiError(500, message, "internal_error", "server_error")


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else {}
    return JSONResponse(
        error_body(str(error), error.error_type, error.code), error.status, headers={**headers, **error.headers}
    )
