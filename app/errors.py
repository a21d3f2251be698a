"""One error taxonomy for the service and the one place that maps it to HTTP.

Every error leaves as `{"error": {"type": ..., "message": ...}}`; messages name the problem and
the field, never echo the input (a query text or a base64 image) and never carry a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of the domain errors; `status` and `type` decide the HTTP answer."""

    status = 500
    type = "internal_error"
    headers: dict[str, str] | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    status, type = 400, "invalid_input"


class ValidationFailed(ServiceError):
    status, type = 422, "validation_error"


class UnsupportedMediaType(ServiceError):
    status, type = 415, "unsupported_media_type"


class InvalidImage(ServiceError):
    status, type = 400, "invalid_image"


class UnsupportedImage(ServiceError):
    status, type = 415, "unsupported_image"


class NotFound(ServiceError):
    status, type = 404, "not_found"


class EmptySide(ServiceError):
    """The index holds nothing of the kind searched: no captions (images indexed without them) or
    no images (an index of labels alone). An empty answer would look like "nothing matched"."""

    status, type = 409, "empty_index"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class BodyTooLarge(Exception):
    """Raised from inside `receive` when a streamed body passes the limit; the body-limit
    middleware turns it into a 413. Parsers above it must let it through."""


class Overloaded(ServiceError):
    status, type = 429, "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class DeadlineExceeded(ServiceError):
    status, type = 504, "timeout"


class NotReady(ServiceError):
    status, type = 503, "not_ready"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": "1"}


class ModelFailure(ServiceError):
    status, type = 500, "model_error"


_HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
               422: "validation_error", 429: "overloaded"}


def error_body(type_: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message}}


def error_field(error: Mapping[str, Any]) -> str:
    """Where a pydantic error is: `terms.0.text`, `body` for the body as a whole."""
    return ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"


def error_message(error: Mapping[str, Any]) -> str:
    """What a pydantic error says. Our validators' messages are sentences of their own: pydantic's
    "Value error, " before them is dropped."""
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


def validation_message(errors: Iterable[Mapping[str, Any]], limit: int = 5) -> str:
    """pydantic errors as one line, `field: message; ...`, the first `limit` of them."""
    return "; ".join(f"{error_field(e)}: {error_message(e)}" for e in list(errors)[:limit])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            logger.warning("%s %s: %s", request.method, request.url.path, exc.message)
        return JSONResponse(error_body(exc.type, exc.message), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the offending input back (a whole base64 image, say): not ours.
        return JSONResponse(error_body("validation_error", validation_message(exc.errors())), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(error_body(_HTTP_TYPES.get(exc.status_code, "error"), message), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal error; see the server log"), 500)
