"""Optional API-key authentication (``MM_API_KEYS``); an empty key list turns it off.

A key is sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. Keys are compared in
constant time and never logged. ``/health`` (and the OpenAPI page ``/docs``) need no key.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from service.errors import APIError

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header value, read as :class:`HTTPBearer` reads it."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    return credentials if scheme.lower() == "bearer" else None


def key_matches(key: str | None, keys: list[str]) -> bool:
    if not key:
        return False
    # compare against every key so timing does not reveal which one almost matched
    matches = [hmac.compare_digest(key.encode(), k.encode()) for k in keys]
    return any(matches)


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    if key_matches(bearer.credentials if bearer else None, keys) or key_matches(header_key, keys):
        return
    raise APIError(
        401,
        "a valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        headers={"WWW-Authenticate": "Bearer"},
    )
