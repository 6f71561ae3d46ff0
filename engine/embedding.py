"""The embedding request: in-process tiers, then the remote tier and the backbone for what is
missing, then complete — one path for the CLI, the HTTP scheduler, training and scoring jobs.

``prepare`` asks memory and the local store; ``fill`` asks Redis and runs the backbone for the
distinct misses (LoRA rows inside the same forwards); ``write_back`` sends new vectors to Redis;
``finish`` merges the answers, flags truncation and records the statistics once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

from headfleet.cache import content_key, normalise_text
from headfleet.embedder.embedder import Embedded
from headfleet.names import check_name
from headfleet.engine.types import (_CHARS_PER_TOKEN_FLOOR, ADAPTER_NS, adapter_of_namespace, Answer, Compute, EmbedBatch, EmbedRequest,
                                    Filled, Prepared)

log = logging.getLogger(__name__)


class TruncationMemo:
    """Whether the text behind a content key was cut to the backbone's ``max_length``, remembered
    for the last ``size`` keys (oldest forgotten first; ~100 bytes an entry). Only texts long enough
    to need the check are put here (:meth:`EmbeddingMixin.finish`).

    A cache hit does not carry the flag (the tiers hold vectors only), so a text that may exceed
    ``max_length`` was re-tokenised on every hit: ~0.1 ms of a ~0.5 ms cached ``/classify`` for one
    SMS-length text. Keys name the namespace (a tenant's own, a granted shared one, an adapter's), so
    one tenant's texts never answer for another's. Thread-safe."""

    def __init__(self, size: int = 65_536):
        self.size = size
        self._flags: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bool | None:
        return self._flags.get(key)

    def put(self, keys: Sequence[bytes], flags: Sequence[bool]) -> None:
        with self._lock:
            for key, flag in zip(keys, flags):
                self._flags[key] = bool(flag)
            while len(self._flags) > self.size:  # popitem(last=False) stays O(1) under churn
                self._flags.popitem(last=False)

    def __len__(self) -> int:
        return len(self._flags)


class EmbeddingMixin:
    # -- embeddings through the cache ---------------------------------------------------------
    def namespace_for(self, tenant: str, namespace: str | None) -> str:
        if namespace is None:
            return f"tenant:{tenant}"
        check_name(namespace, "namespace")
        return f"shared:{namespace}"

    def prepare(self, tenant: str, texts: Sequence[str], namespace: str | None = None, *,
                ns: str | None = None) -> "Prepared":
        """Normalise and key ``texts`` and ask the in-process tiers (memory, local store).

        ``ns``: the full cache namespace, as :meth:`plan` gives it (a LoRA classifier's
        ``adapter:<tenant>/<name>@<version>``); default: the tenant's or the shared ``namespace``.

        What is still missing goes to :meth:`fill` — directly (CLI, jobs) or through the
        service's scheduler, which packs the misses of many requests into one batch.
        """
        t0 = time.perf_counter()
        ns = ns or self.namespace_for(tenant, namespace)
        norm = [normalise_text(t) for t in texts]
        fp, max_len = self.embedder.fingerprint, self.embedder.max_length
        if ns.startswith(ADAPTER_NS):  # adapter rows may run another forward than plain rows
            fp = self.embedder.lora_fingerprint
        keys = [content_key(fp, ns, max_len, t) for t in norm]
        found = self.cache.lookup(keys, tenant, namespaces=[ns] * len(keys), stop=self.cache.n_local, record=False)
        vectors = np.empty((len(texts), self.embedder.dim), dtype=np.float32)
        todo: dict[bytes, list[int]] = {}  # a text repeated inside one call is looked up and embedded once
        for i, v in enumerate(found.vectors):
            if v is None:
                todo.setdefault(keys[i], []).append(i)
            else:
                vectors[i] = v
        return Prepared(tenant, ns, norm, keys, vectors, list(found.tiers), list(found.corrupt_at), todo,
                        (time.perf_counter() - t0) * 1e3)

    def fill(self, keys: Sequence[bytes], texts: Sequence[str], namespaces: Sequence[str],
             progress: Callable[[int], None] | None = None) -> "Filled":
        """Distinct missing keys: ask the remote tier (Redis), then run the backbone for the rest.

        New vectors go into the in-process tiers at once; the remote write is left to
        :meth:`write_back`, so the caller can take it off the reply path.
        """
        keys, ns = list(keys), list(namespaces)
        m = len(keys)
        vectors = np.empty((m, self.embedder.dim), dtype=np.float32)
        tiers: list[str | None] = [None] * m
        corrupt = [0] * m
        n_local = self.cache.n_local
        missing = list(range(m))
        if m and n_local < len(self.cache.tiers):
            far = self.cache.lookup(keys, "", namespaces=ns, start=n_local, record=False)
            corrupt = far.corrupt_at
            missing = []
            for j, v in enumerate(far.vectors):
                if v is None:
                    missing.append(j)
                else:
                    vectors[j], tiers[j] = v, far.tiers[j]
            if progress is not None and m > len(missing):
                progress(m - len(missing))
        truncated = np.zeros(m, dtype=bool)
        computed = np.zeros(m, dtype=bool)
        write = ([], np.empty((0, self.embedder.dim), dtype=np.float32), [])
        if missing:
            out = self._embed_rows([texts[j] for j in missing], [ns[j] for j in missing], progress)
            vectors[missing] = out.vectors
            truncated[missing] = out.truncated
            computed[missing] = True
            write = ([keys[j] for j in missing], out.vectors, [ns[j] for j in missing])
            self.cache.store(*write, stop=n_local)
        return Filled(vectors, tiers, truncated, computed, corrupt, write)

    def _embed_rows(self, texts: Sequence[str], namespaces: Sequence[str],
                    progress: Callable[[int], None] | None) -> Embedded:
        """The backbone for distinct missing texts; rows in an ``adapter:`` namespace get their
        adapter's delta inside the same forwards. Adapters are pinned in device slots for the
        forward; more adapters than half the slots are served in several rounds, so two batches in
        flight always fit."""
        aids = [adapter_of_namespace(n) for n in namespaces]
        if not any(aids):
            return self.embedder.embed(texts, progress=progress)
        manager = self.adapter_manager()
        distinct = list(dict.fromkeys(a for a in aids if a))
        per_round = max(1, manager.max_slots // 2)
        n = len(texts)
        vectors = np.empty((n, self.embedder.dim), dtype=np.float32)
        n_tokens = np.zeros(n, dtype=np.int64)
        truncated = np.zeros(n, dtype=bool)
        for r in range(0, len(distinct), per_round):
            chunk = set(distinct[r: r + per_round])
            rows = [i for i, a in enumerate(aids) if a in chunk or (r == 0 and a is None)]
            slots = self._acquire_slots(manager, list(chunk))
            try:
                out = self.embedder.embed([texts[i] for i in rows], progress=progress,
                                          slots=[slots[aids[i]] if aids[i] else -1 for i in rows])
            finally:
                manager.release(chunk)
            vectors[rows], n_tokens[rows], truncated[rows] = out.vectors, out.n_tokens, out.truncated
        return Embedded(vectors, n_tokens, truncated)


    def write_back(self, filled: "Filled") -> None:
        """Write newly computed vectors into the remote tier(s); a no-op without Redis."""
        keys, vectors, ns = filled.write
        if keys and self.cache.n_local < len(self.cache.tiers):
            self.cache.store(keys, vectors, ns, start=self.cache.n_local)

    def finish(self, prep: "Prepared", answers: dict[bytes, tuple[np.ndarray, str | None, bool, bool, int]],
               classifiers: Sequence[str] = (), extra_ms: dict[str, float] | None = None, *,
               quiet: bool = False) -> EmbedBatch:
        """Merge :meth:`fill`'s answers (key -> vector, tier, truncated, computed here, corrupt)
        into the prepared request, flag truncation of cached long texts, record the stats once.
        ``quiet``: the service's own lookups (a monitor's canary): no truncation flags for cached
        texts (no re-tokenising), nothing recorded in the tenant's cache statistics."""
        max_len = self.embedder.max_length
        truncated = np.zeros(len(prep.keys), dtype=bool)
        computed = 0
        known_keys, known_flags = [], []

        def may_be_cut(i: int) -> bool:  # a shorter text cannot reach max_length (types._CHARS_PER_TOKEN_FLOOR)
            return len(prep.norm[i]) * _CHARS_PER_TOKEN_FLOOR + 2 > max_len

        for key, rows in prep.todo.items():
            vec, tier, trunc, was_computed, corrupt = answers[key]
            prep.vectors[rows] = vec
            truncated[rows] = trunc
            computed += bool(was_computed)
            prep.corrupt[rows[0]] += corrupt
            for i in rows:
                prep.tiers[i] = tier
            if was_computed and may_be_cut(rows[0]):
                known_keys.append(key)  # only a text a later hit would otherwise re-tokenise
                known_flags.append(trunc)
        if known_keys:
            self.truncation.put(known_keys, known_flags)
        if not quiet:
            cached_long = []
            for i, t in enumerate(prep.tiers):
                if t is not None and may_be_cut(i):
                    flag = self.truncation.get(prep.keys[i])
                    if flag is None:
                        cached_long.append(i)
                    else:
                        truncated[i] = flag
            if cached_long:
                flags = self.embedder.count_tokens([prep.norm[i] for i in cached_long]).truncated
                truncated[cached_long] = flags
                self.truncation.put([prep.keys[i] for i in cached_long], flags)
            self.stats.record(prep.tenant, classifiers, prep.tiers, sum(prep.corrupt))
        if computed and not quiet:
            self.stats.record_computed(prep.tenant, computed)
        timing = {"cache": prep.cache_ms, **(extra_ms or {})}
        return EmbedBatch(prep.vectors, prep.tiers, truncated, computed, timing)

    # -- the request driver: begin (in-process tiers) -> compute (injected) -> complete ----------
    def begin(self, tenant: str, texts: Sequence[str], groups: Sequence[tuple[str, Sequence[str]]]) -> EmbedRequest:
        """Key ``texts`` once per group ``(cache namespace, classifier names)`` and ask the in-process
        tiers; what is still missing, distinct over all groups, is the request's ``keys``."""
        preps = [self.prepare(tenant, texts, ns=ns) for ns, _ in groups]
        keys, todo, spaces = self.misses(preps)
        return EmbedRequest(tenant, preps, [list(names) for _, names in groups], keys, todo, spaces)

    def compute_here(self, keys: Sequence[bytes], texts: Sequence[str], namespaces: Sequence[str],
                     progress: Callable[[int], None] | None = None) -> tuple[dict[bytes, Answer], dict[str, float]]:
        """The default compute step, in this thread: Redis, then the backbone, then the Redis write.
        Returns ``(key -> Answer, {"embed": ms})``; ``progress(n)`` counts keys answered."""
        t1 = time.perf_counter()
        filled = self.fill(keys, texts, namespaces, progress=progress)
        self.write_back(filled)
        return filled.answers(keys), {"embed": (time.perf_counter() - t1) * 1e3}

    def complete(self, request: EmbedRequest, answers: dict[bytes, Answer],
                 extra_ms: dict[str, float] | None = None, *, quiet: bool = False) -> list[EmbedBatch]:
        """One :class:`EmbedBatch` per group, statistics recorded once each; then every observer in
        ``embedded_hooks`` is called with ``(tenant, classifier names per group, batches)``.
        ``quiet`` (see :meth:`finish`): no statistics, no observers."""
        batches = [self.finish(prep, answers, names, extra_ms, quiet=quiet)
                   for prep, names in zip(request.preps, request.names)]
        for hook in () if quiet else self.embedded_hooks:
            try:
                hook(request.tenant, request.names, batches)
            except Exception:  # an observer's bug must not cost a tenant its answer
                log.exception("embedded hook %r failed", hook)
        return batches

    def embed_request(self, tenant: str, texts: Sequence[str], groups: Sequence[tuple[str, Sequence[str]]], *,
                      compute: Compute | None = None, progress: Callable[[int], None] | None = None,
                      quiet: bool = False) -> list[EmbedBatch]:
        """The one embedding request path: :meth:`begin`, ``compute(keys, texts, namespaces, progress)``
        for the distinct misses (default :meth:`compute_here`; the service's training jobs pass one
        that goes through the scheduler), :meth:`complete`. ``progress(n)`` counts the request's
        rows as they are answered (with one group: hits first, then computed texts, then repeats).
        ``quiet``: the service's own lookups, kept out of the tenant's statistics (:meth:`finish`)."""
        request = self.begin(tenant, texts, groups)
        single = len(groups) == 1
        n_miss = sum(map(len, request.preps[0].todo.values())) if single else 0
        if progress is not None and single and len(texts) > n_miss:
            progress(len(texts) - n_miss)
        answers: dict[bytes, Answer] = {}
        extra: dict[str, float] = {"embed": 0.0}
        if request.keys:
            answers, extra = (compute or self.compute_here)(request.keys, request.texts, request.namespaces,
                                                            progress)
        if progress is not None and single and n_miss > len(request.keys):
            progress(n_miss - len(request.keys))  # in-call repeats of texts just computed
        return self.complete(request, answers, extra, quiet=quiet)

    def embed(self, tenant: str, texts: Sequence[str], *, namespace: str | None = None,
              classifiers: Sequence[str] = (), progress: Callable[[int], None] | None = None,
              compute: Compute | None = None) -> EmbedBatch:
        """Vectors for ``texts`` ``[n, dim]`` in the tenant's (or the shared ``namespace``'s) cache:
        :meth:`embed_request` with one group."""
        ns = self.namespace_for(tenant, namespace)
        return self.embed_request(tenant, texts, [(ns, classifiers)], compute=compute, progress=progress)[0]

    def embed_groups(self, tenant: str, texts: Sequence[str], groups: Sequence[tuple[str, Sequence[str]]], *,
                     progress: Callable[[int], None] | None = None) -> list[EmbedBatch]:
        """One :class:`EmbedBatch` per ``(namespace, classifier names)`` of :meth:`plan`, with the
        misses of every namespace in the same backbone forwards (LoRA rows beside plain rows)."""
        return self.embed_request(tenant, texts, groups, progress=progress)

    @staticmethod
    def misses(preps: Sequence["Prepared"]) -> tuple[list[bytes], list[str], list[str]]:
        """The distinct missing keys of several prepared requests, with the text and namespace of each."""
        keys, texts, spaces = [], [], []
        seen: set[bytes] = set()
        for prep in preps:
            for key, rows in prep.todo.items():
                if key in seen:
                    continue
                seen.add(key)
                keys.append(key)
                texts.append(prep.norm[rows[0]])
                spaces.append(prep.namespace)
        return keys, texts, spaces
