"""The API key: which requests carry it, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Request

from api.errors import ApiError
from settings import ServerSettings


def key_matches(given: str, key: str | None) -> bool:
    return key is not None and hmac.compare_digest(given.encode(), key.encode())


def require_api_key(server: ServerSettings) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if not server.api_key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not key_matches(token.strip(), server.api_key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    return check
