"""Optional API keys: ``Authorization: Bearer <key>`` on ``/v1/*`` when ``api_keys`` is set."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .dependencies import SettingsDep
from .errors import Unauthorized

bearer = HTTPBearer(auto_error=False, description="one of the server's API keys (only if VPDSR_API_KEYS is set)")


async def require_api_key(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    keys = settings.api_keys
    if not keys:
        return
    token = credentials.credentials.encode() if credentials else b""
    # Compare against every key in constant time: no early exit that a timing attack could see.
    matches = [hmac.compare_digest(token, key.get_secret_value().encode()) for key in keys]
    if not token or not any(matches):
        raise Unauthorized(
            "missing or invalid API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
