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
    ClientGoneError,
    ConflictError,
    CorruptVersionError,
    ForbiddenError,
    HeadfleetError,
    InvalidJSONError,
    NotFoundError,
    OverloadedError,
    ParentMismatchError,
    TooLargeError,
    TrainingDataError,
    UnauthorizedError,
    ValidationError,
    clip_message,
)
from headfleet.service.request import param_of

log = logging.getLogger(__name__)

# Most specific first: the first class the exception is an instance of wins.
STATUS: list[tuple[type[HeadfleetError], int]] = [
    (TooLargeError, 413),
    (InvalidJSONError, 400),
    (TrainingDataError, 422),
    (ValidationError, 422),
    (UnauthorizedError, 401),
    (ForbiddenError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (ParentMismatchError, 409),
    (OverloadedError, 429),
    (ClientGoneError, 499),
    (CorruptVersionError, 503),
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


# OpenAI's error ``type`` by status, for the ``/v1`` routes (its clients raise on these)
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                 422: "invalid_request_error", 429: "rate_limit_error"}


def error_response(request: Request, status: int, message: str, error_type: str,
                   headers: dict[str, str] | None = None, param: str | None = None) -> Response:
    """``{"error", "error_type"}``; on ``/v1/*`` OpenAI's ``{"error": {"message", "type", "param", "code"}}``
    (``code`` is headfleet's error_type), so the official client's exception carries the reason."""
    service = getattr(request.app.state, "service", None)
    if service is not None:
        service.metrics.failures.labels(error_type).inc()
    message = clip_message(message)  # any message quoting the client's input (a domain error is clipped already)
    if request.url.path.startswith("/v1/"):
        body: dict = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error" if status >= 500
                                                                               else "invalid_request_error"),
                                "param": param, "code": error_type}}
    else:
        body = {"error": message, "error_type": error_type}
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def on_domain_error(request: Request, exc: HeadfleetError) -> Response:
    headers = None
    if isinstance(exc, OverloadedError):
        headers = {"Retry-After": str(max(1, int(round(exc.retry_after))))}
    return error_response(request, status_of(exc), exc.message, exc.error_type, headers, exc.param)


def on_validation(request: Request, exc: ValidationException) -> Response:
    """A body that is not JSON is a 400; JSON of the wrong shape or types is a 422 naming the field."""
    body = getattr(request, "_body", None)
    if isinstance(body, bytes) and not body.strip():  # Litestar skips decoding an empty body
        return error_response(request, 400, "request body is empty; send a JSON object", "invalid_json")
    detail = str(exc.detail or "")
    extra = exc.extra if isinstance(exc.extra, list) else []
    messages = []
    param = None
    for item in extra:
        if isinstance(item, dict):
            msg = str(item.get("message", ""))
            key = item.get("key")
            messages.append(f"{key}: {msg}" if key and key != "data" and key not in msg else msg)
            param = param or param_of(msg)
    text = "; ".join(m for m in messages if m) or detail
    if "malformed" in text.lower() or "json is malformed" in detail.lower():
        return error_response(request, 400, f"request body is not valid JSON: {text}", "invalid_json")
    return error_response(request, 422, text, "validation_error", param=param)


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
