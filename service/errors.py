"""Domain errors -> HTTP, in one table; every error body is ``{"error": ..., "error_type": ...}``.

Handlers never build error responses: they raise (``headfleet.errors``), and the exception
handlers registered by ``create_app`` turn the exception into a response here, counting it
under its ``error_type``. Litestar's own errors (unknown route, wrong method, body too large,
a body that does not decode) get the same body shape.
"""

from __future__ import annotations

import logging

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from headfleet.errors import (
    BackendError,
    ConflictError,
    ForbiddenError,
    HeadfleetError,
    NotFoundError,
    OverloadedError,
    ParentMismatchError,
    TooLargeError,
    TrainingDataError,
    UnauthorizedError,
    ValidationError,
)
from headfleet.service.scheduler import ClientGoneError

log = logging.getLogger(__name__)

# Most specific first: the first class the exception is an instance of wins.
STATUS: list[tuple[type[HeadfleetError], int]] = [
    (TooLargeError, 413),
    (TrainingDataError, 422),
    (ValidationError, 422),
    (UnauthorizedError, 401),
    (ForbiddenError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (ParentMismatchError, 409),
    (OverloadedError, 429),
    (ClientGoneError, 499),
    (BackendError, 503),
    (HeadfleetError, 500),
]

_HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type", 429: "overloaded"}


def status_of(exc: HeadfleetError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(request: Request, status: int, message: str, error_type: str,
                   headers: dict[str, str] | None = None) -> Response:
    service = getattr(request.app.state, "service", None)
    if service is not None:
        service.metrics.failures.labels(error_type).inc()
    return Response({"error": message, "error_type": error_type}, status_code=status, media_type=MediaType.JSON,
                    headers=headers)


def on_domain_error(request: Request, exc: HeadfleetError) -> Response:
    headers = None
    if isinstance(exc, OverloadedError):
        headers = {"Retry-After": str(max(1, int(round(exc.retry_after))))}
    return error_response(request, status_of(exc), exc.message, exc.error_type, headers)


def on_validation(request: Request, exc: ValidationException) -> Response:
    """A body that is not JSON is a 400; JSON of the wrong shape or types is a 422 naming the field."""
    detail = str(exc.detail or "")
    extra = exc.extra if isinstance(exc.extra, list) else []
    messages = []
    for item in extra:
        if isinstance(item, dict):
            msg = str(item.get("message", ""))
            key = item.get("key")
            messages.append(f"{key}: {msg}" if key and key != "data" and key not in msg else msg)
    text = "; ".join(m for m in messages if m) or detail
    if "malformed" in text.lower() or "json is malformed" in detail.lower():
        return error_response(request, 400, f"request body is not valid JSON: {text}", "invalid_json")
    return error_response(request, 422, text, "validation_error")


def on_http(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    detail = str(exc.detail or "")
    if status == 404 and detail in ("", "Not Found"):
        detail = f"no route {request.method} {request.url.path}"
    if status == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    if status == 400 and "json" in request.headers.get("content-type", ""):
        return error_response(request, 400, f"request body is not valid JSON: {detail}", "invalid_json")
    if status == 413:
        max_body = getattr(request.app.state, "settings", None)
        limit = f" (limit {max_body.max_body_bytes} bytes)" if max_body is not None else ""
        detail = f"request body too large{limit}"
    return error_response(request, status, detail, _HTTP_TYPES.get(status, "http_error"),
                          dict(exc.headers) if exc.headers else None)


def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, 500, f"internal error ({type(exc).__name__}); it was logged", "internal_error")


HANDLERS = {
    HeadfleetError: on_domain_error,
    ValidationException: on_validation,
    HTTPException: on_http,
    Exception: on_unexpected,
}
