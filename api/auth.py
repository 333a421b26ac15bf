"""The API key: which requests carry it, compared in constant time."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable

from fastapi import Request

from api.errors import ApiError
from settings import ServerSettings


def key_matches(given: str, key: str | None) -> bool:
    return key is not None and hmac.compare_digest(given.encode(), key.encode())


def key_in(scheme: str, token: str) -> str:
    """The key a client sent: a bearer token, or the password of HTTP basic auth (AUTOMATIC1111's
    clients send --api-auth that way); any user name."""
    if scheme.lower() == "bearer":
        return token
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(token, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


def require_api_key(server: ServerSettings) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if not server.api_key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if not key_matches(key_in(scheme, token.strip()), server.api_key):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>' (or HTTP basic auth with the key as "
                "password)",
                "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check
