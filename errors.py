"""One error vocabulary for the service, and the one place that maps errors to HTTP.

Every error a client can see is a ``ServiceError`` subclass carrying its HTTP status,
OpenAI error ``type`` and ``code``. ``register_error_handlers`` turns those, Werkzeug's
HTTP exceptions and anything unexpected into OpenAI's ``{"error": {...}}`` body, so no
view ever builds an error response by hand and no traceback ever reaches a client.

Another API under its own paths (Anthropic's ``/v1/messages``) registers its own error
body with ``register_error_shape``: every error on those paths, from a view, the auth hook
or routing (404, 405), is then written in that shape, with the same status.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, current_app, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error the API reports to clients."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self._detail = detail
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI-shaped error object."""
        return error_body(self.message, self.type, self.param, self.code)

    @property
    def detail(self) -> str:
        """The whole story, for the server log, events and admins, where ``message`` (what any
        caller reads) leaves something out (see ``hide``); else the message."""
        return self._detail if self._detail is not None else self.message

    def hide(self, secrets: list[str] | tuple[str, ...], placeholder: str) -> ServiceError:
        """Replace each of ``secrets`` in the message (not the detail) by ``placeholder``; ``self``.

        For RPC servers' addresses: the protocol has no authentication, so only admins learn
        where the servers are. A failed load's error is shared by every caller waiting on it,
        so the choice is made where it is written (``error_response``), per caller.
        """
        if self._detail is None and secrets:
            self._detail = self.message
        for secret in sorted(secrets, key=len, reverse=True):  # "h:8050" before "h:80"
            self.message = self.message.replace(secret, placeholder)
        return self

    def rename_param(self, param: str | None) -> None:
        """Name the field ``param`` (as another API calls it), in the message as well."""
        if self.param is None or param is None or param == self.param:
            return
        def renamed(text: str) -> str:
            new = re.sub(rf"(?<![\w.]){re.escape(old)}(?!\w)", lambda _: param, text)
            return new if new != text else f"{param}: {text}"

        old = self.param
        self.message = renamed(self.message)
        if self._detail is not None:
            self._detail = renamed(self._detail)
        self.param = param


class InvalidRequest(ServiceError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(ServiceError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ServiceError):
    status = 403
    type = "invalid_request_error"
    code = "insufficient_permissions"


class ModelNotFound(ServiceError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(ServiceError):
    """Something other than a model that the request names does not exist (a stored response)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class NotAModel(ServiceError):
    """The file exists but is not a loadable model (not GGUF, truncated, vocab-only)."""

    status = 422
    type = "invalid_request_error"
    code = "model_file_invalid"


class NotSupported(InvalidRequest):
    """An endpoint of another API that this server deliberately does not offer."""

    code = "not_supported"


class ModelBusy(ServiceError):
    status = 409
    type = "conflict_error"
    code = "model_busy"


class QueueFull(ServiceError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class NoCapacity(ServiceError):
    """No room to load a model because the models holding it are busy."""

    status = 503
    type = "server_error"
    code = "capacity_exhausted"


class TooManyStreams(ServiceError):
    """Every worker thread set aside for event streams is taken."""

    status = 503
    type = "server_error"
    code = "too_many_event_streams"


class LoadFailed(ServiceError):
    status = 500
    type = "server_error"
    code = "model_load_failed"


class InferenceFailed(ServiceError):
    status = 500
    type = "server_error"
    code = "inference_failed"


class ModelCrashed(ServiceError):
    """The model's worker process died (a crash in llama.cpp, the OOM killer, a kill)."""

    status = 500
    type = "server_error"
    code = "model_crashed"


class ShuttingDown(ServiceError):
    status = 503
    type = "server_error"
    code = "shutting_down"


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """Build ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# Werkzeug's HTTP errors keep their status; these give them OpenAI codes.
_HTTP_CODES = {
    400: ("invalid_request_error", "invalid_request"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


class HTTPError(ServiceError):
    """One of Werkzeug's HTTP errors (404, 405, 413, ...), keeping its status."""

    def __init__(self, exc: HTTPException) -> None:
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 405:
            message = f"Method not allowed on this endpoint; allowed: {', '.join(exc.valid_methods or [])}"
        elif status == 413:
            message = "Request body is larger than the server's limit (server.max_request_body)"
        allow = {key: value for key, value in exc.get_headers() if key.lower() == "allow"}
        self.type, code = _HTTP_CODES.get(status, ("invalid_request_error", "http_error"))
        super().__init__(message, code=code, headers=allow)
        self.status = status


ErrorShape = Callable[[ServiceError], dict[str, Any]]
_SHAPES = "error_shapes"  # app.extensions key: [(path prefix, shape)]
_SEES_DETAIL = "error_sees_detail"  # app.extensions key: register_error_handlers' sees_detail


def register_error_shape(app: Flask, prefix: str, shape: ErrorShape) -> None:
    """Write errors on ``prefix`` (the path itself and everything under it) as ``shape(error)``."""
    app.extensions.setdefault(_SHAPES, []).append((prefix.rstrip("/"), shape))


def register_error_handlers(app: Flask, sees_detail: Callable[[], bool] = lambda: False) -> None:
    """Install the handlers that turn every exception into an error response.

    ``sees_detail``: whether the current request's caller may read an error's ``detail``
    (an admin); others read its ``message``.
    """
    app.extensions[_SEES_DETAIL] = sees_detail

    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError) -> Response:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return error_response(HTTPError(exc))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(ServiceError("Internal server error; see the server log"))


def error_response(exc: ServiceError) -> Response:
    """The JSON response for a service error, in the shape of the API the request went to."""
    shape = _shape(request.path) if has_request_context() else ServiceError.body
    response = jsonify(shape(for_caller(exc, caller_sees_detail())))
    response.status_code = exc.status
    response.headers.update(exc.headers)
    return response


def caller_sees_detail() -> bool:
    """Whether the current request's caller may read errors' ``detail`` (register_error_handlers'
    ``sees_detail``); False outside a request. Ask in the view: a stream's body runs after it."""
    return has_request_context() and bool(current_app.extensions.get(_SEES_DETAIL, lambda: False)())


def for_caller(exc: ServiceError, sees_detail: bool) -> ServiceError:
    """``exc`` as its caller may read it: a copy carrying the detail as its message for one
    who may see it, else ``exc`` itself."""
    if not sees_detail or exc.detail == exc.message:
        return exc
    shown = copy.copy(exc)
    shown.message = exc.detail
    return shown


def _shape(path: str) -> ErrorShape:
    for prefix, shape in current_app.extensions.get(_SHAPES, ()):
        if path == prefix or path.startswith(prefix + "/"):
            return shape
    return ServiceError.body
