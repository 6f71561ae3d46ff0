"""Every domain error headfleet raises, in one module.

Each layer raises these; only the service maps them to HTTP status (one table in
``headfleet.service.errors``). ``error_type`` is the stable name clients see in
``{"error": ..., "error_type": ...}``.
"""

from __future__ import annotations

MAX_MESSAGE = 2_000  # characters of an error message a person reads; a longer one is cut in the middle


def clip_message(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` cut in the middle when over ``limit`` characters: its start and its end (where
    the reason and the fix usually are, after a quoted input) with the count cut between them, so
    a message quoting a 100 KB input is neither 100 KB long nor stripped of its explanation."""
    if len(message) <= limit:
        return message
    head, tail = limit // 2, limit // 2 - 100
    return f"{message[:head]} ...({len(message) - head - tail:,} characters cut)... {message[-tail:]}"


class HeadfleetError(Exception):
    """``message``: what went wrong and what to do, for a person (:func:`clip_message`: at most
    about 2,000 characters, whatever it quotes); ``param``: the request field it concerns, when
    there is one (OpenAI-shaped errors on ``/v1`` carry it)."""

    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None):
        message = clip_message(str(message))
        super().__init__(message)
        self.message = message
        self.param = param


class ValidationError(HeadfleetError):
    """The caller's input is malformed or out of range."""

    error_type = "validation_error"


class TooLargeError(ValidationError):
    """A request exceeds a configured limit (texts, classifiers, characters)."""

    error_type = "too_large"


class TrainingDataError(ValidationError):
    """Training data that cannot give a usable classifier (one class, too few examples, empty texts)."""

    error_type = "training_data_error"


class UnauthorizedError(HeadfleetError):
    """No API key, or one that maps to no tenant."""

    error_type = "unauthorized"


class ForbiddenError(HeadfleetError):
    """A valid key asking for something only the admin key may do."""

    error_type = "forbidden"


class NotFoundError(HeadfleetError):
    """Unknown classifier, version or alias — also what a tenant gets for another tenant's classifier."""

    error_type = "not_found"


class ConflictError(HeadfleetError):
    """A write that lost a race or would overwrite something immutable."""

    error_type = "conflict"


class ParentMismatchError(HeadfleetError):
    """A head or adapter trained on another backbone than the one loaded."""

    error_type = "parent_mismatch"


class OverloadedError(HeadfleetError):
    """Admission control refused the work; retry later."""

    error_type = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class BackendError(HeadfleetError):
    """The backbone or a storage backend failed."""

    error_type = "backend_error"


class NoAdapterSlotError(OverloadedError):
    """Every LoRA device slot is held by a batch in flight or pinned; retry shortly."""

    error_type = "no_adapter_slot"


class AdapterImportError(ValidationError):
    """A LoRA adapter that cannot be served on this backbone (another base, other shapes, options
    that change more than low-rank deltas)."""

    error_type = "adapter_import_error"


class InvalidJSONError(ValidationError):
    """A request body that is not JSON at all (or not UTF-8, or nested too deeply to read)."""

    error_type = "invalid_json"


class CorruptVersionError(BackendError):
    """A stored classifier version whose files do not match their manifest's sha256 or cannot be read.

    Raised when the version is loaded; the message names ``tenant/name@version`` and the way out
    (retrain it, or restore the version folder from a backup, or point the alias at another version).
    """

    error_type = "corrupt_version"


class ClientGoneError(HeadfleetError):
    """The client disconnected while its texts were waiting; nobody is left to answer."""

    error_type = "client_gone"


class Cancelled(HeadfleetError):
    """A scoring job was cancelled between two chunks; committed chunks stay committed."""

    error_type = "cancelled"
