"""What crosses a boundary of the engine, as named types.

``EmbedBatch`` (a request's vectors with where each came from), ``Prepared`` (a request after the
in-process tiers), ``Filled`` (what the remote tier and the backbone gave for the misses),
``Resolved`` (a classifier reference resolved to a loaded version).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import numpy as np

from headfleet.names import TIER_NAMES

# A WordPiece or byte-level BPE token spans at least a quarter of a character, so a text of at
# most (max_length - 2) // 4 characters cannot be truncated and needs no tokenising on a cache hit.
_CHARS_PER_TOKEN_FLOOR = 4
ADAPTER_NS = "adapter:"  # cache namespace prefix of a LoRA classifier's embeddings: adapter:<id>
ADAPTER_LOAD = "adapter_load"  # timing_ms phase: reading a request's adapters at resolution (ms)


@dataclasses.dataclass
class EmbedBatch:
    vectors: np.ndarray  # [n, dim] float32
    tiers: list[str | None]  # per text: the tier that answered, None when the backbone computed it
    truncated: np.ndarray  # [n] bool
    computed: int  # distinct texts the backbone embedded
    timing_ms: dict[str, float]

    def cache_report(self) -> dict:
        hits = dict.fromkeys(TIER_NAMES, 0)
        for t in self.tiers:
            if t is not None:
                hits[t] = hits.get(t, 0) + 1
        return {"hits": hits, "misses": sum(t is None for t in self.tiers), "computed": self.computed}


@dataclasses.dataclass
class Prepared:
    """A request after the in-process tiers: rows still missing are grouped by key in ``todo``."""

    tenant: str
    namespace: str  # the cache namespace ("tenant:<t>" or "shared:<ns>")
    norm: list[str]  # normalised texts (what is embedded and keyed)
    keys: list[bytes]
    vectors: np.ndarray  # [n, dim] float32; rows in ``todo`` not yet filled
    tiers: list[str | None]
    corrupt: list[int]
    todo: dict[bytes, list[int]]  # distinct missing key -> its rows
    cache_ms: float


@dataclasses.dataclass
class Filled:
    """What :meth:`Engine.fill` found or computed for a list of distinct keys."""

    vectors: np.ndarray  # [m, dim] float32
    tiers: list[str | None]  # "redis" or None (computed)
    truncated: np.ndarray  # [m] bool, for computed rows
    computed: np.ndarray  # [m] bool
    corrupt: list[int]
    write: tuple[list[bytes], np.ndarray, list[str]]  # what the remote tier still has to receive

    def answers(self, keys: Sequence[bytes]) -> dict[bytes, "Answer"]:
        return {k: Answer(self.vectors[j], self.tiers[j], bool(self.truncated[j]), bool(self.computed[j]),
                          self.corrupt[j]) for j, k in enumerate(keys)}


class Answer(NamedTuple):
    """What the compute step found for one distinct missing key."""

    vector: np.ndarray  # [dim] float32
    tier: str | None  # "redis", or None when the backbone computed it
    truncated: bool  # the text was longer than the backbone's max length
    computed: bool  # the backbone embedded it for this request
    corrupt: int  # undecodable entries met on the way (counted misses)


@dataclasses.dataclass
class EmbedRequest:
    """A request after the in-process tiers (:meth:`Engine.begin`): one ``Prepared`` per group, and
    the distinct keys still missing over all groups, each with its text and cache namespace."""

    tenant: str
    preps: list[Prepared]
    names: list[list[str]]  # classifier names per group (statistics)
    keys: list[bytes]
    texts: list[str]
    namespaces: list[str]


# compute(keys, texts, namespaces, progress) -> (key -> Answer, extra timings in ms)
Compute = Callable[[Sequence[bytes], Sequence[str], Sequence[str], "Callable[[int], None] | None"],
                   "tuple[dict[bytes, Answer], dict[str, float]]"]




class Resolved(NamedTuple):
    """A classifier reference as the request named it, resolved to one loaded version."""

    ref: str  # as asked: "spam", "spam@3", "spam@prod"
    key: str  # the fleet key "<tenant>/<name>@<version>"
    manifest: dict  # the version's manifest


class Scored(NamedTuple):
    """One classify request after its heads ran, as ``scored_hooks`` observers see it."""

    tenant: str
    resolved: list[Resolved]  # every version the request resolved, in the order asked
    answer: dict  # the reply being built: results[i]["classifications"][ref] = {label(s), scores, version}
    source: str  # "classify" for live traffic, "job" for a scoring job's chunk
    parts: list[tuple[EmbedBatch, list[Resolved]]]  # per embedding group: its vectors [n, dim] and its classifiers
    texts: Sequence[str] = ()  # the request's texts, in order
    route: "Route | None" = None  # what the choosers decided (unit, shadows, experiment tags)
    shadows: dict[str, list[dict]] = {}  # live ref -> per text, the shadow version's classification entry
    ms: float = 0.0  # the request's time until its heads ran, milliseconds


# -- routing: what lifecycle choosers may change about a live request ------------------------

#: A shadow's key in the answer while it is being scored (never a ref a client can send: ``#``
#: is not a name character); removed before the reply is built.
SHADOW_REF = "#shadow:"


@dataclasses.dataclass
class Choice:
    """A live classify request's classifiers as the choosers see and change them (one per request,
    before resolution). A chooser may re-point a ref it serves (``targets["spam"] = "spam@4"``: the
    answer still says ``spam``), add a version to score beside a ref without answering it
    (``shadows["spam"] = "spam@5"``) and tag a ref's classification entries (``tags``)."""

    tenant: str
    unit: str | None  # the experiment unit the request carries (a user id), or None
    refs: list[str]  # distinct refs as asked, in order
    targets: dict[str, str] = dataclasses.field(default_factory=dict)
    shadows: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, dict] = dataclasses.field(default_factory=dict)


class Route(NamedTuple):
    """A request's classifiers after the choosers ran, resolved and pinned (release with
    :meth:`Engine.release` of :attr:`every`)."""

    resolved: list[Resolved]  # what the answer is built from: one per distinct ref asked
    shadows: list[Resolved]  # scored on the same rows, not answered; ref = SHADOW_REF + the live ref
    tags: dict[str, dict]  # ref -> fields added to each of its classification entries
    unit: str | None
    # milliseconds resolution spent reading adapters not used since start (on ONNX Runtime the first
    # one also loads the backbone's torch copy and the LoRA graph): the answer's timing_ms["adapter_load"]
    adapter_load_ms: float = 0.0

    @property
    def every(self) -> list[Resolved]:
        return self.resolved + self.shadows


# chooser(choice): changes ``choice`` in place; runs on the request's thread, so it must be cheap
Chooser = Callable[[Choice], None]


def adapter_id(key: str, manifest: dict) -> str:
    """A LoRA classifier version's adapter id, ``<tenant>/<name>@<version>#<adapter sha256[:16]>``:
    the adapter manager's key, and (behind :data:`ADAPTER_NS`) its embeddings' cache namespace, so a
    version whose adapter changed can never read another's vectors."""
    return f"{key}#{manifest['adapter']['sha256'][:16]}"


def parse_adapter_id(aid: str) -> tuple[str, str, str]:
    """``adapter_id``'s inverse: ``(tenant, "<name>@<version>", sha256 prefix)``."""
    key, _, sha = aid.partition("#")
    tenant, _, ref = key.partition("/")
    return tenant, ref, sha


def adapter_of_namespace(namespace: str) -> str | None:
    """The adapter id a cache namespace belongs to, or None for a shared-embedding namespace."""
    return namespace[len(ADAPTER_NS):] if namespace.startswith(ADAPTER_NS) else None
