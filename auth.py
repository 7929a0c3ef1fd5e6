"""API keys: ``api_keys`` guard ``/v1`` and Ollama's ``/api``, ``admin_api_keys`` guard ``/admin``
and ``/metrics``.

An admin key also works on ``/v1`` and ``/api``. Without admin keys, ``/admin`` falls back to the
``/v1`` keys, so setting only ``api_keys`` never leaves the admin endpoints open.
Keys arrive as ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` and are compared
in constant time against every configured key, so timing says nothing about which keys
exist or how much of one matched.
"""

from __future__ import annotations

import hmac

from flask import Flask, request

from config import ServerSettings
from errors import Forbidden, Unauthorized


def install_auth(app: Flask, settings: ServerSettings) -> None:
    """Check keys before every request that needs one."""
    user_keys = [k.encode() for k in settings.api_keys]
    admin_keys = [k.encode() for k in settings.admin_api_keys] or user_keys
    if not user_keys and not admin_keys:
        return

    @app.before_request
    def _check_key() -> None:
        if request.method == "OPTIONS":
            return  # CORS preflights carry no credentials
        required = _required(request.path, settings, user_keys, admin_keys)
        if required is None:
            return
        presented = _presented_key()
        if presented is None:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        if _matches(presented, required):
            return
        if required is admin_keys and _matches(presented, user_keys):
            raise Forbidden("This key may use /v1 but not the admin endpoints")
        raise Unauthorized("Invalid API key")


def caller_is_admin(settings: ServerSettings) -> bool:
    """Whether the current request may see what ``/admin`` shows: it presented an admin key,
    or the admin endpoints need none (no keys configured at all)."""
    admin_keys = [k.encode() for k in settings.admin_api_keys or settings.api_keys]
    if not admin_keys:
        return True
    presented = _presented_key()
    return presented is not None and _matches(presented, admin_keys)


# Outside /v1, the endpoints that read a model as /v1 does (llama.cpp's server names them).
USER_PATHS = frozenset({"/tokenize", "/detokenize", "/apply-template", "/rerank"})


def _required(path: str, settings: ServerSettings, user_keys: list[bytes],
              admin_keys: list[bytes]) -> list[bytes] | None:
    if path.startswith("/admin") or path == "/metrics":
        return admin_keys or None
    if path.startswith(("/v1", "/api/")) or path in USER_PATHS:
        return (user_keys + admin_keys) if user_keys else None
    if path == "/health" and settings.health_requires_key:
        return user_keys + admin_keys
    return None


def _presented_key() -> bytes | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip().encode()
    key = request.headers.get("x-api-key", "").strip()
    return key.encode() if key else None


def _matches(presented: bytes, keys: list[bytes]) -> bool:
    """Constant-time membership: every key is compared, whatever matches first."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found
