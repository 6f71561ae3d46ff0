"""Request bodies: one JSON decoder for every endpoint, so one error contract.

Litestar decodes ``data: JSONBody[...]`` through ``Request.json()``; :class:`HeadfleetRequest`
replaces that step with :func:`decode_json_body`, which every hand-decoded body (the multipart-or-
JSON ``POST /classifiers``) uses too. Whatever the endpoint, a body that is not JSON — empty, not
UTF-8, malformed, a lone UTF-16 surrogate escape, nested deeper than the decoder's recursion limit —
is 400 ``invalid_json`` naming what is wrong; JSON of the wrong shape is 422 naming the field.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.types import Empty

from headfleet.errors import InvalidJSONError, ValidationError

T = TypeVar("T")

# \uD800-\uDFFF written as a JSON escape; msgspec refuses a lone one with a misleading "truncated"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def decode_json_body(body: bytes) -> Any:
    """The JSON value of a request body; raises InvalidJSONError (400) saying why it is not JSON."""
    if not body or not body.strip():
        raise InvalidJSONError("request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body)
    except RecursionError:
        raise InvalidJSONError("request body is nested too deeply to read; flatten the JSON") from None
    except msgspec.DecodeError as exc:
        text = str(exc)
        if "truncated" in text or "invalid" in text.lower():
            m = _SURROGATE_ESCAPE.search(body)
            if m is not None and _lone_surrogate(body):
                raise InvalidJSONError(f"request body is not valid JSON: {m.group().decode()} at byte {m.start()} "
                                       "is half of a UTF-16 surrogate pair (a lone surrogate is not Unicode text)"
                                       ) from None
        raise InvalidJSONError(f"request body is not valid JSON: {text}") from None


def _lone_surrogate(body: bytes) -> bool:
    """Whether the stdlib decoder (which accepts lone surrogates) sees one: confirms the diagnosis."""
    import json

    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


def param_of(message: str) -> str | None:
    """The top-level field a msgspec validation message names (``... - at `$.texts[0]``` -> ``texts``)."""
    m = re.search(r"at `\$\.([A-Za-z_]\w*)", message)
    return m.group(1) if m else None


def convert(value: Any, typ: type[T]) -> T:
    """``value`` (decoded JSON) as the msgspec Struct ``typ``, types as written (strict);
    ValidationError (422) naming the field."""
    try:
        return msgspec.convert(value, typ, strict=True)
    except msgspec.ValidationError as exc:
        message, param = str(exc), param_of(str(exc))
        allowed = _choices(typ, param) if message.startswith("Invalid enum value") else None
        if allowed:
            message += f" (expected one of: {', '.join(map(repr, allowed))})"
        raise ValidationError(message, param=param) from None


def _choices(typ: type, param: str | None) -> tuple | None:
    """The values a top-level ``Literal[...]`` field of the Struct ``typ`` takes (None otherwise)."""
    if param is None:
        return None
    import typing

    for f in msgspec.structs.fields(typ):
        if f.encode_name == param:
            args = typing.get_args(f.type) if typing.get_origin(f.type) is typing.Literal else ()
            return args or None
    return None


class HeadfleetRequest(Request):
    """Litestar's request with :func:`decode_json_body` as its JSON decoder."""

    async def json(self) -> Any:
        if self._json is Empty:
            if (cached := self._connection_state.json) is not Empty:
                self._json = cached
            else:
                value = _integral(decode_json_body(await self.body()))
                _check_strict(self.route_handler, value)
                self._json = self._connection_state.json = value
        return self._json


def _check_strict(handler, value: Any) -> None:
    """Litestar converts bodies leniently (``0`` for ``false``, ``"1"`` for ``1``); headfleet takes
    JSON types as written, so the body is first checked strictly against the handler's Struct."""
    field = handler.parsed_fn_signature.parameters.get("data") if handler is not None else None
    typ = getattr(field, "annotation", None)
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        convert(value, typ)


def _integral(value: Any) -> Any:
    """JSON has one number type: ``3.0`` is the integer 3 (as JSON Schema says), so integral floats
    count as integers in the strict check; every other type must be what the field says."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


async def uploaded_examples(form, *, multi_label: bool, label_col: str = "label", missing: str):
    """The labelled examples of a multipart form's ``file`` part (.csv with a header row, or .jsonl),
    read with its ``text_col``/``label_col`` fields (defaults ``text``/``label_col``); ``missing``
    is the 422 message when there is no file part. Training and canary uploads both come here."""
    from litestar.datastructures import UploadFile

    from headfleet.heads.loaders import parse_examples

    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ValidationError(missing, param="file")
    return parse_examples(upload.filename or "upload", await upload.read(),
                          text_col=str(form.get("text_col") or "text"),
                          label_col=str(form.get("label_col") or label_col), multi_label=multi_label)
