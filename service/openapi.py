"""The OpenAPI document: what the API really answers, errors included.

Litestar documents every handler's errors with its own ``{status_code, detail, extra}`` body, which
headfleet never sends. :func:`document_errors` replaces that, on every operation, with the statuses
it can answer and the body it answers them with (``{"error", "error_type"}``; OpenAI's
``{"error": {"message", "type", "param", "code"}}`` on ``/v1``), declares the two ways to send a
key (``Authorization: Bearer`` and ``X-API-Key``), and marks the operations served without a key.
The JSON document is at ``/schema`` (and ``/schema/openapi.json``); Swagger UI at ``/schema/swagger``.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from headfleet import __version__
from headfleet.names import NAME_RE
from headfleet.text import visible_pattern


class ErrorBody(msgspec.Struct):
    """Every error headfleet answers (except on ``/v1``)."""

    error: str  # what went wrong and what to do
    error_type: str  # stable name: invalid_json, unauthorized, forbidden, not_found, validation_error, ...


class OpenAIErrorDetail(msgspec.Struct):
    message: str
    type: str  # invalid_request_error, authentication_error, permission_error, rate_limit_error, server_error
    param: str | None  # the request field concerned, when there is one
    code: str  # headfleet's error_type


class OpenAIErrorBody(msgspec.Struct):
    """Errors on ``/v1/*``, in OpenAI's shape, so its clients' exceptions carry the reason."""

    error: OpenAIErrorDetail


_DESCRIPTIONS = {
    400: "The body is not JSON (invalid_json), or a path parameter is malformed",
    401: "No API key, or an unknown one (unauthorized)",
    403: "The key may not do this: admin-only endpoint, or a namespace or path not granted (forbidden)",
    404: "No such classifier, version, alias, job or route — also another tenant's (not_found)",
    409: "Conflicts with the current state (conflict)",
    413: "Over a configured limit: body size, texts, characters or tokens (too_large)",
    422: "Well-formed JSON with a wrong field, type or value, or unusable data (validation_error, ...)",
    429: "Admission control: too much queued for this tenant or overall; see Retry-After (overloaded)",
    503: "A stored classifier version failed its integrity check, or a backend is unavailable",
}
_PUBLIC = {"/health", "/info"}  # served without a key


def _statuses(path: str, method: str) -> list[int]:
    out = [401]
    if method in ("POST", "PUT", "PATCH"):
        out += [400, 413, 422]
    if path.startswith(("/classifiers", "/jobs", "/admin", "/v1/embeddings", "/feedback")) or "{" in path \
            or path == "/classify":
        out += [404, 422]
    if path.startswith(("/classifiers", "/jobs", "/admin", "/experiments")):
        out += [409]
    if path.startswith("/experiments"):
        out += [404, 422]
    if path.startswith(("/admin", "/metrics", "/jobs", "/classify", "/v1", "/embed")):
        out += [403]
    if path in ("/classify", "/embed", "/v1/embeddings", "/feedback") or path.startswith(("/classifiers", "/jobs")):
        out += [429, 503]
    if path == "/admin/backbone/reload":
        out += [503]  # the recorded backbone failed to start (the previous one serves again)
    if path in _PUBLIC:
        out = []
    return sorted(set(out))


class PreciseJsonPlugin(JsonRenderPlugin):
    """Serves the document with the constraints Litestar does not derive (see :func:`precise`)."""

    def __init__(self) -> None:
        super().__init__(path=["/openapi.json"])
        self._bytes: bytes | None = None

    def render(self, request, openapi_schema: dict[str, Any]) -> bytes:
        if self._bytes is None:
            from headfleet.service.api.embeddings import backbone_prompts, model_names

            service = getattr(request.app.state, "service", None)
            prompts = backbone_prompts(str(service.engine.embedder.folder)) if service is not None else ()
            models = model_names(service) if service is not None else ()
            e = service.engine.embedder if service is not None else None
            self._bytes = msgspec.json.encode(precise(copy.deepcopy(openapi_schema), request.app.state.settings,
                                                      prompts, models, e.dim if e else None,
                                                      bool(e.pooling.normalize) if e else False))
        return self._bytes


def precise(doc: dict[str, Any], settings, prompts=(), models=(), dim: int | None = None,
            normalize: bool = False) -> dict[str, Any]:
    """Add what the code enforces and Litestar's generator leaves out: unknown fields refused
    (``additionalProperties: false``), name patterns on path parameters and name fields, the
    request limits from ``settings`` (texts, classifiers, characters), and the shapes of
    ``input``/``inputs``. Semantic rules JSON Schema cannot state (a text needs visible content
    and must fit the backbone's tokens unless truncated; training data needs two usable classes;
    a source must exist in the tenant's folder) stay in the descriptions and answer 413/422."""
    name = {"type": "string", "pattern": NAME_RE.pattern}
    ref = {"type": "string", "pattern": REF_PATTERN}
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Text"] = {"type": "string", "minLength": 1, "maxLength": settings.max_chars_per_text,
                       "pattern": visible_pattern(), "description": "A text with visible content: not only "
                       "whitespace, zero-width, formatting or other blank characters (the pattern finds one "
                       "character that is not blank). Longer than the backbone's token limit: 413 unless truncated."}
    text = {"$ref": "#/components/schemas/Text"}
    texts = {"type": "array", "items": text, "minItems": 1, "maxItems": settings.max_texts_per_request}
    classifiers = {"type": "array", "items": ref, "minItems": 1, "maxItems": settings.max_classifiers_per_request}
    for title, body in schemas.items():
        if title.endswith("Request"):
            body["additionalProperties"] = False
    props = lambda title: schemas.get(title, {}).get("properties", {})  # noqa: E731
    if "ClassifyRequest" in schemas:
        props("ClassifyRequest").update(texts=texts, classifiers=classifiers,
                                        namespace={"oneOf": [name, {"type": "null"}]})
    if "ScoreJobRequest" in schemas:
        props("ScoreJobRequest").update(classifiers=classifiers, namespace={"oneOf": [name, {"type": "null"}]},
                                        source={"type": "string", "minLength": 1, "maxLength": 4096})
    if "TEIEmbedRequest" in schemas:
        prompts = sorted(prompts or ())
        props("TEIEmbedRequest").update(inputs={"oneOf": [text, texts]}, prompt_name={"oneOf": [
            {"type": "string", "enum": prompts}, {"type": "null"}]} if prompts else {"type": "null"})
    if "OpenAIEmbeddingsRequest" in schemas:
        props("OpenAIEmbeddingsRequest").update(input={"oneOf": [text, texts]}, user={"type": "null"})
        if models:
            props("OpenAIEmbeddingsRequest")["model"] = {"type": "string", "enum": list(models)}
    if "NamespaceRequest" in schemas:
        props("NamespaceRequest")["members"] = {"type": "array", "items": name}
    if "AliasRequest" in schemas:
        props("AliasRequest")["version"] = {"type": "integer", "minimum": 1}
    if "FeedbackRequest" in schemas:
        props("FeedbackRequest").update(classifier=ref, items=_examples_schema())
    if "MonitorSettingsRequest" in schemas:
        _monitor_ranges(props("MonitorSettingsRequest"))
    _experiment_schemas(props, name)
    _plan_schema(schemas, name)
    canary = doc.get("paths", {}).get("/classifiers/{name}/canary", {}).get("put")
    if canary is not None:
        canary["requestBody"] = canary_body()
    train = doc.get("paths", {}).get("/classifiers", {}).get("post")
    if train is not None:
        train["requestBody"] = train_body()
        train["requestBody"]["content"]["application/json"]["schema"]["properties"]["name"] = name
    if "TEIEmbedRequest" in schemas and normalize:
        props("TEIEmbedRequest")["normalize"] = {"type": "boolean", "const": True, "default": True}
    if "OpenAIEmbeddingsRequest" in schemas and dim:
        props("OpenAIEmbeddingsRequest")["dimensions"] = {"oneOf": [{"type": "integer", "const": dim},
                                                                    {"type": "null"}]}
    for param in doc.get("paths", {}).get("/experiments", {}).get("get", {}).get("parameters", []):
        if param.get("name") == "after":
            param["schema"] = {"oneOf": [{"type": "string", "pattern": EXPERIMENT_ID}, {"type": "null"}]}
    patterns = {"name": REF_PATTERN, "alias": ALIAS_PATTERN, "tenant_name": NAME_RE.pattern,
                "namespace": NAME_RE.pattern, "key_id": "^[0-9a-f]{12}$", "job_id": "^[A-Za-z0-9_-]{1,64}$",
                "exp_id": EXPERIMENT_ID}
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            for param in op.get("parameters", []) if isinstance(op, dict) else []:
                if param.get("in") == "path" and param.get("name") in patterns:
                    pattern = patterns[param["name"]]
                    if param["name"] == "name" and ("/aliases/" in path or op is item.get("delete")):
                        pattern = NAME_RE.pattern  # a classifier name only: no @version here
                    param["schema"] = {"type": "string", "pattern": pattern}
    return doc


EXPERIMENT_ID = r"^exp-[0-9a-f]{12}$"
REF_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}(@([1-9][0-9]{0,8}|[a-z][a-z0-9_-]{0,31}))?$"
ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="headfleet", version=__version__, path="/schema",
        render_plugins=[PreciseJsonPlugin(), SwaggerRenderPlugin(path="/swagger")],
        components=Components(security_schemes={
            "bearer": SecurityScheme(type="http", scheme="bearer", description="Authorization: Bearer <API key>"),
            "apiKey": SecurityScheme(type="apiKey", name="X-API-Key", security_scheme_in="header"),
        }),
        security=[{"bearer": []}, {"apiKey": []}],
    )


def document_errors(app: Litestar) -> None:
    """Give every operation of ``app`` headfleet's error responses and its security (call once,
    after the app is built and before the document is first served)."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            if not getattr(handler, "include_in_schema", True) or route.path.startswith("/schema"):
                continue
            body = OpenAIErrorBody if route.path.startswith("/v1") else ErrorBody
            methods = sorted(getattr(handler, "http_methods", ()))
            responses: dict[int, ResponseSpec] = {}
            for method in methods:
                for status in _statuses(route.path, method):
                    responses[status] = ResponseSpec(data_container=body, description=_DESCRIPTIONS[status],
                                                     generate_examples=False)
            handler.responses = {**responses, **(handler.responses or {})}
            if route.path in _PUBLIC:
                handler.security = [{}]


def train_body() -> dict[str, Any]:
    """``POST /classifiers`` takes JSON or a multipart upload, so it decodes its own body and
    Litestar cannot see it; this documents both."""
    from headfleet.service.schemas import TrainRequest

    schema = {**_inline(TrainRequest), "additionalProperties": False}
    upload = {"type": "object", "required": ["file", "name"], "properties": {
        "file": {"type": "string", "format": "binary", "description": ".csv with a header row, or .jsonl"},
        "name": {"type": "string", "pattern": NAME_RE.pattern}, "kind": {"type": "string", "enum": ["logreg", "mlp", "lora"]},
        "text_col": {"type": "string", "default": "text"}, "label_col": {"type": "string", "default": "label"},
        "multi_label": {"type": "boolean", "default": False}, "seed": {"type": "integer", "minimum": 0},
        "candidate": {"type": "boolean", "default": False}}}
    return {"required": True, "content": {"application/json": {"schema": schema},
                                          "multipart/form-data": {"schema": upload}}}


def _examples_schema() -> dict[str, Any]:
    """Labelled examples as feedback and canaries take them: at least one ``{"text", "label"}`` (or
    ``"labels"``); a label outside the classifier's labels is a 422 JSON Schema cannot foresee."""
    label = {"oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
    item = {"type": "object", "required": ["text"], "additionalProperties": False, "properties": {
        "text": {"$ref": "#/components/schemas/Text"}, "label": label, "labels": {"type": "array", "items": label}}}
    return {"type": "array", "minItems": 1, "items": item}


def canary_body() -> dict[str, Any]:
    """``PUT /classifiers/{name}/canary`` takes JSON or a multipart upload (like training)."""
    upload = {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": ".csv with a header row, or .jsonl"},
        "text_col": {"type": "string", "default": "text"}, "label_col": {"type": "string", "default": "label"}}}
    schema = {"type": "object", "required": ["examples"], "additionalProperties": False,
              "properties": {"examples": _examples_schema()}}
    return {"required": True, "content": {"application/json": {"schema": schema},
                                          "multipart/form-data": {"schema": upload}}}


def _monitor_ranges(props: dict[str, Any]) -> None:
    """The ranges ``lifecycle.settings.merge_settings`` enforces, stated in the document."""
    from headfleet.lifecycle.settings import INT_FIELDS, NULLABLE, RANGES

    for field, (lo, hi) in RANGES.items():
        if field in props:
            bounded = {"type": "integer" if field in INT_FIELDS else "number", "minimum": lo, "maximum": hi}
            props[field] = {"oneOf": [bounded, {"type": "null"}]} if field in NULLABLE else bounded
    props["webhook"] = {"oneOf": [{"type": "string", "pattern": r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^\s]*)?$"},
                                  {"type": "null"}]}


def _inline(struct: type) -> dict[str, Any]:
    """A msgspec Struct's JSON schema with its definitions inlined (it has no nested Structs)."""
    schema = msgspec.json.schema(struct)
    name = schema["$ref"].rsplit("/", 1)[-1]
    return schema["$defs"][name]


def _experiment_schemas(props, name: dict[str, Any]) -> None:
    """What ``lifecycle.experiment_config`` and the shadow's ``set`` enforce, stated in the document."""
    from headfleet.lifecycle.experiment_config import GUARDRAILS, MAX_TEXT_CHARS, MAX_UNIT_CHARS
    from headfleet.lifecycle.experiments import MAX_ITEMS

    nullable = lambda schema: {"oneOf": [schema, {"type": "null"}]}  # noqa: E731
    version = {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 999_999_999},
                         {"type": "string", "pattern": r"^([1-9][0-9]{0,8}|[a-z][a-z0-9_-]{0,31})$"}],
               "description": "a version number, or an alias (pinned to its version now)"}
    label = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS}
    unit = {"type": "string", "minLength": 1, "maxLength": MAX_UNIT_CHARS, "pattern": "^[^\\u0000-\\u001f\\u007f]+$",
            "description": "an experiment unit (user, session or account id): no control characters"}
    props("ClassifyRequest")["unit"] = nullable(unit)
    guard = {"type": "object", "additionalProperties": False, "properties": {
        k: {"type": "number", "minimum": lo, "maximum": hi} for k, (lo, hi) in GUARDRAILS.items()}}
    props("ExperimentRequest").update(
        classifier=name, control=version, treatment=version, name=nullable(label), metric=nullable(label),
        split=nullable({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}),
        min_samples=nullable({"type": "integer", "minimum": 2, "maximum": 10**9}), guardrails=nullable(guard))
    item = {"type": "object", "required": ["unit", "value"], "properties": {
        "unit": unit, "value": {"type": "number"}, "id": label, "segment": label}}
    props("OutcomesRequest")["items"] = {"type": "array", "minItems": 1, "maxItems": MAX_ITEMS, "items": item}
    props("ShadowRequest").update(version=version, sample=nullable({"type": "number", "exclusiveMinimum": 0,
                                                                    "maximum": 1}))


def _plan_schema(schemas: dict[str, Any], name: dict[str, Any]) -> None:
    """``PlanRequest`` as ``PlanRequest.checked`` enforces it: fractions in [0, 1], exactly one of
    ``tenant``/``all_tenants``, and at least one of ``to``/``backend``/``precision`` naming the candidate."""
    body = schemas.get("PlanRequest")
    if body is None:
        return
    fraction = {"type": "number", "minimum": 0, "maximum": 1}
    body["properties"].update(tenant={"oneOf": [name, {"type": "null"}]}, max_drop=fraction,
                              max_negative_flips=fraction,
                              to={"oneOf": [{"type": "string", "minLength": 1, "maxLength": 4096}, {"type": "null"}],
                                  "description": "a model folder on the server (404 when it is not one)"})
    body["allOf"] = [
        {"oneOf": [{"required": ["tenant"], "properties": {"tenant": name, "all_tenants": {"const": False}}},
                   {"required": ["all_tenants"], "properties": {"all_tenants": {"const": True},
                                                                "tenant": {"type": "null"}}}]},
        {"anyOf": [{"required": [field], "properties": {field: {"type": "string"}}}
                   for field in ("to", "backend", "precision")]}]
