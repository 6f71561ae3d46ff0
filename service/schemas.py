"""Request and response bodies, one msgspec Struct per operation (they also make ``/schema``).

Unknown fields are refused, so a typo ("classifier" for "classifiers") is a 422 naming the
field rather than a silently ignored option.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec


class ClassifyRequest(msgspec.Struct, forbid_unknown_fields=True):
    texts: list[str]
    classifiers: list[str]  # "name", "name@3" (a version) or "name@prod" (an alias)
    namespace: str | None = None  # a shared cache namespace inside this tenant; default: the tenant's own
    unit: str | None = None  # the experiment unit (a user id): sticky arm assignment; or the X-Unit-Id header
    debug: bool = False  # each shadowed classification also shows its shadow version's entry


class ExperimentArm(msgspec.Struct):
    id: str
    arm: str  # "control" | "treatment"
    version: int


class ShadowEntry(msgspec.Struct, omit_defaults=True):
    classifier: str
    version: int
    scores: dict[str, float]
    label: str | None = None
    labels: list[str] | None = None


class Classification(msgspec.Struct, omit_defaults=True):
    classifier: str
    version: int
    scores: dict[str, float]
    label: str | None = None  # single-label heads
    labels: list[str] | None = None  # multi-label heads: every label scoring >= 0.5
    experiment: ExperimentArm | None = None  # the request named the bare classifier of a running experiment
    shadow: ShadowEntry | None = None  # "debug": true and the classifier has a shadow


class TextResult(msgspec.Struct):
    index: int
    truncated: bool
    cache: Annotated[Literal["memory", "local", "redis", "miss", "partial"], msgspec.Meta(description=(
        "Over every embedding the text needed (the shared one for heads, one per LoRA classifier): the "
        "slowest tier that held them when every one was held, 'miss' when every one was computed, "
        "'partial' when some were held and some computed."))]
    classifications: dict[str, Classification]


class CacheReport(msgspec.Struct):
    hits: dict[str, int]
    misses: int
    computed: int


class ClassifierError(msgspec.Struct):
    error: str
    error_type: str  # "corrupt_version": the version's files failed their sha256 check


class ClassifyResponse(msgspec.Struct, omit_defaults=True):
    results: list[TextResult]
    cache: CacheReport
    timing_ms: Annotated[dict[str, float], msgspec.Meta(description=(
        "Milliseconds per phase: adapter_load (reading adapters of LoRA versions not used since start, "
        "with the backbone's torch copy and LoRA graph on ONNX Runtime; 0 when none), cache, queue, embed, heads, total."))]
    # classifiers asked for that could not be served (a corrupt stored version); the others answered
    errors: dict[str, ClassifierError] | None = None


class TrainRequest(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    examples: list[dict[str, Any]]  # {"text": ..., "label": ...}; multi-label: "labels": [...]
    kind: Literal["logreg", "mlp", "lora"] = "logreg"  # lora: an adapter in the backbone plus a head
    multi_label: bool = False
    seed: int = 0
    candidate: bool = False  # publish with the "candidate" alias; "latest" stays (a shadow's or an experiment's treatment)


class AliasRequest(msgspec.Struct, forbid_unknown_fields=True):
    version: int


class ScoreJobRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /jobs``: score a store in the tenant's scoring folder (paths are relative to it)."""

    source: str  # a .jsonl/.csv/.parquet file, a folder of them, or an SQLite database
    classifiers: list[str]
    type: Literal["score"] = "score"
    output: str | None = None  # .parquet or .jsonl; default scores/<job id>.parquet
    id_col: str = "id"
    text_col: str = "text"
    table: str | None = None  # SQLite: the table (default: the only one)
    format: Literal["parquet", "jsonl"] | None = None  # default: from the output's suffix
    namespace: str | None = None
    overwrite: bool = False  # replace a finished output at the same path


class TEIEmbedRequest(msgspec.Struct, forbid_unknown_fields=True):
    """text-embeddings-inference's ``POST /embed`` body. Every field is honoured or refused: unknown
    fields are a 422 naming them; ``truncation_direction`` "Left" and ``normalize: false`` on a
    normalising backbone are refused; ``prompt_name`` selects one of the backbone's
    sentence-transformers prompts (``config_sentence_transformers.json``), prepended to each input,
    and names one it does not have is a 422 listing those it has."""

    inputs: str | list[str]
    normalize: bool = True
    truncate: bool = False
    truncation_direction: Literal["Right", "right"] = "Right"
    prompt_name: str | None = None


class OpenAIEmbeddingsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """OpenAI's ``POST /v1/embeddings`` body (token-id inputs are refused with a clear error).
    ``dimensions`` must be the backbone's own; ``user`` (an end-user id for abuse monitoring) is
    refused, since headfleet would neither record nor act on it."""

    input: Any
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class OpenAIEmbedding(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class OpenAIUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(msgspec.Struct):
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage
    object: str = "list"


class FeedbackRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /feedback``: labels for texts a classifier scored (every version: ``@N`` is ignored)."""

    classifier: str
    items: list[dict[str, Any]]  # {"text", "label"}; multi-label classifiers: {"text", "labels": [...]}


class CanaryRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``PUT /classifiers/{name}/canary``: the frozen core of the canary set (replaces the last one)."""

    examples: list[dict[str, Any]]  # {"text", "label"} or {"text", "labels": [...]}


class MonitorSettingsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``PUT /classifiers/{name}/monitor``: any subset; the rest keep their values (defaults at first)."""

    window_texts: int | None | msgspec.UnsetType = msgspec.UNSET
    window_seconds: float | msgspec.UnsetType = msgspec.UNSET
    psi: float | msgspec.UnsetType = msgspec.UNSET
    domain_auc: float | msgspec.UnsetType = msgspec.UNSET
    accuracy_slo: float | None | msgspec.UnsetType = msgspec.UNSET
    accuracy_drop: float | msgspec.UnsetType = msgspec.UNSET
    consecutive: int | msgspec.UnsetType = msgspec.UNSET
    auto_retrain: bool | msgspec.UnsetType = msgspec.UNSET
    webhook: str | None | msgspec.UnsetType = msgspec.UNSET
    cooldown_seconds: float | msgspec.UnsetType = msgspec.UNSET
    retention_windows: int | msgspec.UnsetType = msgspec.UNSET
    feedback_max: int | msgspec.UnsetType = msgspec.UNSET
    rolling_canary: int | msgspec.UnsetType = msgspec.UNSET
    reservoir: int | msgspec.UnsetType = msgspec.UNSET

    def patch(self) -> dict[str, Any]:
        return {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not msgspec.UNSET}


class ExperimentRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /experiments``: a pre-registered A/B test of two versions of a classifier (frozen once created)."""

    classifier: str  # the classifier whose bare-name traffic is split
    control: int | str  # a version number or an alias, pinned to a version now ("3", "prod")
    treatment: int | str  # usually the monitor's "candidate"
    name: str | None = None
    split: float | None = None  # the treatment's share of units, 0 < split < 1 (default 0.5)
    metric: str | None = None  # what the outcomes measure ("conversion"); a label only
    min_samples: int | None = None  # units per arm before a recommendation (default 100)
    guardrails: dict[str, float] | None = None  # {"p99_ms": 50, "error_rate": 0.01}
    sequential: bool | None = None  # always-valid p-value (mSPRT): peeking is safe (default true)
    missing: Literal["zero", "exclude"] | None = None  # exposed units without an outcome (default "zero")

    def body(self) -> dict[str, Any]:
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}


class OutcomesRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /experiments/{id}/outcomes``: per unit, a value of the metric (a unit's values add up)."""

    items: list[dict[str, Any]]  # {"unit": "user-42", "value": 1.0, "id"?: "order-9", "segment"?: "mobile"}


class StopRequest(msgspec.Struct, forbid_unknown_fields=True):
    decision: Literal["promote", "rollback"]


class ShadowRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``PUT /classifiers/{name}/shadow``: score another version on live traffic, unanswered."""

    version: int | str  # a version number or an alias ("candidate"), pinned now
    sample: float | None = None  # LoRA shadows only (they cost a forward): the share of requests scored

    def body(self) -> dict[str, Any]:
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}
