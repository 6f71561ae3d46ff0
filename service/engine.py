"""The in-process pipeline: normalise -> cache tiers -> backbone for misses -> head fan-out.

The CLI, the batch jobs and the HTTP scheduler all drive this one object. State is created
explicitly by :meth:`Engine.open` (backbone -> local store -> Redis) and torn down by
:meth:`Engine.close` in reverse, persisting the local store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from headfleet.cache import CacheStats, FaissStore, MemoryLRU, RedisTier, TieredCache, content_key, normalise_text
from headfleet.embedder import Embedder
from headfleet.errors import NotFoundError, ValidationError
from headfleet.heads import Examples, HeadFleet, Registry, TokenStats, train_head, validate
from headfleet.heads.refs import NAME_RE, check_name
from headfleet.service.provenance import git_commit, library_versions
from headfleet.settings import Settings

log = logging.getLogger(__name__)

# A WordPiece or byte-level BPE token spans at least a quarter of a character, so a text of at
# most (max_length - 2) // 4 characters cannot be truncated and needs no tokenising on a cache hit.
_CHARS_PER_TOKEN_FLOOR = 4


@dataclasses.dataclass
class EmbedBatch:
    vectors: np.ndarray  # [n, dim] float32
    tiers: list[str | None]  # per text: the tier that answered, None when the backbone computed it
    truncated: np.ndarray  # [n] bool
    computed: int  # distinct texts the backbone embedded
    timing_ms: dict[str, float]

    def cache_report(self) -> dict:
        hits = {"memory": 0, "local": 0, "redis": 0}
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

    def answers(self, keys: Sequence[bytes]) -> dict[bytes, tuple]:
        return {k: (self.vectors[j], self.tiers[j], bool(self.truncated[j]), bool(self.computed[j]), self.corrupt[j])
                for j, k in enumerate(keys)}


class Engine:
    def __init__(self, settings: Settings, embedder: Embedder, cache: TieredCache, registry: Registry,
                 stats: CacheStats, redis: RedisTier | None = None, local: FaissStore | None = None):
        self.settings = settings
        self.embedder = embedder
        self.cache = cache
        self.registry = registry
        self.stats = stats
        self.redis = redis
        self.local = local
        self.fleet = HeadFleet()
        self._resolved: dict[tuple[str, str], tuple[tuple, dict]] = {}
        self._registry_root = str(registry.root)
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: Settings | None = None, embedder: Embedder | None = None) -> "Engine":
        """Bring up backbone -> local store -> Redis; ``embedder`` lets several engines share one backbone."""
        settings = settings or Settings.from_env()
        data = Path(settings.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        embedder = embedder or Embedder.load(settings.model_path, max_length=settings.max_length,
                                             batch_size=settings.batch_size, device=settings.device,
                                             threads=settings.threads, backend=settings.backend,
                                             precision=settings.precision, cache_dir=data / "onnx")
        fp = embedder.fingerprint
        tiers: list = [MemoryLRU(int(settings.memory_cache_mb * 2**20))]
        local = None
        if settings.faiss_store:
            local = FaissStore(embedder.dim, fp, data / "cache" / f"local-{fp[:16]}.faiss.npz")
            tiers.append(local)
        redis = None
        if settings.redis_url:
            redis = RedisTier(settings.redis_url, embedder.dim, fp, ttl_s=settings.redis_ttl_s,
                              prefix=settings.redis_prefix)
            if not redis.ping():
                log.warning("Redis at %s is not answering; serving from the other tiers until it does",
                            settings.redis_url)
            tiers.append(redis)
        stats = CacheStats()
        return cls(settings, embedder, TieredCache(tiers, stats), Registry(data / "registry"), stats,
                   redis=redis, local=local)

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- embeddings through the cache ---------------------------------------------------------
    def namespace_for(self, tenant: str, namespace: str | None) -> str:
        if namespace is None:
            return f"tenant:{tenant}"
        check_name(namespace, "namespace")
        return f"shared:{namespace}"

    def prepare(self, tenant: str, texts: Sequence[str], namespace: str | None = None) -> "Prepared":
        """Normalise and key ``texts`` and ask the in-process tiers (memory, local store).

        What is still missing goes to :meth:`fill` — directly (CLI, jobs) or through the
        service's scheduler, which packs the misses of many requests into one batch.
        """
        t0 = time.perf_counter()
        ns = self.namespace_for(tenant, namespace)
        norm = [normalise_text(t) for t in texts]
        fp, max_len = self.embedder.fingerprint, self.embedder.max_length
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
            out = self.embedder.embed([texts[j] for j in missing], progress=progress)
            vectors[missing] = out.vectors
            truncated[missing] = out.truncated
            computed[missing] = True
            write = ([keys[j] for j in missing], out.vectors, [ns[j] for j in missing])
            self.cache.store(*write, stop=n_local)
        return Filled(vectors, tiers, truncated, computed, corrupt, write)

    def write_back(self, filled: "Filled") -> None:
        """Write newly computed vectors into the remote tier(s); a no-op without Redis."""
        keys, vectors, ns = filled.write
        if keys and self.cache.n_local < len(self.cache.tiers):
            self.cache.store(keys, vectors, ns, start=self.cache.n_local)

    def finish(self, prep: "Prepared", answers: dict[bytes, tuple[np.ndarray, str | None, bool, bool, int]],
               classifiers: Sequence[str] = (), extra_ms: dict[str, float] | None = None) -> EmbedBatch:
        """Merge :meth:`fill`'s answers (key -> vector, tier, truncated, computed here, corrupt)
        into the prepared request, flag truncation of cached long texts, record the stats once."""
        max_len = self.embedder.max_length
        truncated = np.zeros(len(prep.keys), dtype=bool)
        computed = 0
        for key, rows in prep.todo.items():
            vec, tier, trunc, was_computed, corrupt = answers[key]
            prep.vectors[rows] = vec
            truncated[rows] = trunc
            computed += bool(was_computed)
            prep.corrupt[rows[0]] += corrupt
            for i in rows:
                prep.tiers[i] = tier
        cached_long = [i for i, t in enumerate(prep.tiers) if t is not None
                       and len(prep.norm[i]) * _CHARS_PER_TOKEN_FLOOR + 2 > max_len]
        if cached_long:
            truncated[cached_long] = self.embedder.count_tokens([prep.norm[i] for i in cached_long]).truncated
        self.stats.record(prep.tenant, classifiers, prep.tiers, sum(prep.corrupt))
        if computed:
            self.stats.record_computed(prep.tenant, computed)
        timing = {"cache": prep.cache_ms, **(extra_ms or {})}
        return EmbedBatch(prep.vectors, prep.tiers, truncated, computed, timing)

    def embed(self, tenant: str, texts: Sequence[str], *, namespace: str | None = None,
              classifiers: Sequence[str] = (), progress: Callable[[int], None] | None = None) -> EmbedBatch:
        """Vectors for ``texts`` in this thread: cache tiers first, the backbone for the distinct misses only."""
        prep = self.prepare(tenant, texts, namespace)
        n_miss = sum(map(len, prep.todo.values()))
        if progress is not None and len(texts) > n_miss:
            progress(len(texts) - n_miss)
        t1 = time.perf_counter()
        keys = list(prep.todo)
        filled = self.fill(keys, [prep.norm[rows[0]] for rows in prep.todo.values()], [prep.namespace] * len(keys),
                           progress=progress)
        if progress is not None and n_miss > len(keys):
            progress(n_miss - len(keys))  # in-call repeats of texts just computed
        self.write_back(filled)
        embed_ms = (time.perf_counter() - t1) * 1e3
        return self.finish(prep, filled.answers(keys), classifiers, {"embed": embed_ms})

    # -- classifiers --------------------------------------------------------------------------
    def _manifest(self, tenant: str, ref: str) -> dict:
        """Resolve ``name[@version|@alias]`` with an in-process cache keyed on the alias file's identity.

        One stat per classifier per call: a train, alias move or delete by another process
        (the CLI beside a running server) is seen on the next request.
        """
        name = ref.partition("@")[0]
        if not NAME_RE.match(name) or not NAME_RE.match(tenant):
            return self.registry.resolve(tenant, ref)  # raises the registry's own error for the bad name
        try:
            st = os.stat(os.path.join(self._registry_root, tenant, name, "aliases.json"))
            ident = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            self._resolved.pop((tenant, ref), None)
            ident = None
        cached = self._resolved.get((tenant, ref))
        if ident is not None and cached is not None and cached[0] == ident:
            return cached[1]
        manifest = self.registry.resolve(tenant, ref)
        if ident is not None:
            self._resolved[(tenant, ref)] = (ident, manifest)
        return manifest

    def _fleet_key(self, tenant: str, ref: str) -> tuple[str, dict]:
        manifest = self._manifest(tenant, ref)
        key = f"{tenant}/{manifest['name']}@{manifest['version']}"
        if key not in self.fleet:
            with self._lock:
                if key not in self.fleet:
                    _, head = self.registry.load(tenant, f"{manifest['name']}@{manifest['version']}",
                                                 self.embedder.fingerprint)
                    self.fleet.add(key, head)
        return key, manifest

    def resolve(self, tenant: str, classifiers: Sequence[str]) -> list[tuple[str, str, dict]]:
        """``[(ref as asked, fleet key, manifest)]`` for distinct refs, heads loaded into the fleet."""
        if not classifiers:
            raise ValidationError("classifiers must name at least one classifier")
        out = []
        for ref in dict.fromkeys(classifiers):
            key, manifest = self._fleet_key(tenant, ref)
            out.append((ref, key, manifest))
        return out

    def score(self, batch: EmbedBatch, resolved: list[tuple[str, str, dict]]) -> dict:
        """Every row of ``batch`` against every resolved classifier: label, scores, version; the cache report."""
        t0 = time.perf_counter()
        out = self.fleet.predict(batch.vectors, [key for _, key, _ in resolved])
        multi = out.multi_label.tolist()
        probs = out.probs.tolist()
        results = []
        for i in range(len(batch.tiers)):
            per = {}
            row = probs[i]
            for j, (ref, _, m) in enumerate(resolved):
                labels = out.labels[j]
                p = row[j][: len(labels)]
                entry = {"classifier": m["id"], "version": m["version"],
                         "scores": {lab: round(x, 6) for lab, x in zip(labels, p)}}
                if multi[j]:
                    entry["labels"] = [lab for lab, x in zip(labels, p) if x >= 0.5]
                else:
                    entry["label"] = labels[max(range(len(p)), key=p.__getitem__)]
                per[ref] = entry
            results.append({"index": i, "truncated": bool(batch.truncated[i]), "cache": batch.tiers[i] or "miss",
                            "classifications": per})
        timing = dict(batch.timing_ms, heads=(time.perf_counter() - t0) * 1e3)
        return {"results": results, "cache": batch.cache_report(),
                "timing_ms": {k: round(v, 3) for k, v in timing.items()}}

    def classify(self, tenant: str, texts: Sequence[str], classifiers: Sequence[str], *,
                 namespace: str | None = None, progress: Callable[[int], None] | None = None) -> dict:
        """Every text against every classifier in this thread: label, scores, version; and the cache report."""
        if not texts:
            raise ValidationError("texts must hold at least one text")
        resolved = self.resolve(tenant, classifiers)
        names = [m["name"] for _, _, m in resolved]
        batch = self.embed(tenant, texts, namespace=namespace, classifiers=names, progress=progress)
        return self.score(batch, resolved)

    def train(self, tenant: str, name: str, examples: Examples, *, kind: str = "logreg", seed: int = 0,
              progress: Callable[[int], None] | None = None,
              embed: Callable[..., EmbedBatch] | None = None) -> dict:
        """Validate, embed through the cache, fit, save a new immutable version; returns its manifest.

        ``embed(tenant, texts, progress=...)`` replaces :meth:`embed` (the service passes one
        that goes through its scheduler, so training shares the backbone fairly).
        """
        check_name(name, "classifier name")
        counts = self.embedder.count_tokens([normalise_text(t) for t in examples.texts]) if examples.texts else None
        stats = None
        if counts is not None:
            stats = TokenStats(unk_share=float(counts.n_unk.sum() / max(1, counts.n_tokens.sum())),
                               truncated_share=float(counts.truncated.mean()))
        report = validate(examples, stats)
        batch = (embed or self.embed)(tenant, examples.texts, progress=progress)
        trained = train_head(batch.vectors, examples, kind=kind, seed=seed, report=report, refit=True)
        manifest = self.registry.save(tenant, name, trained.head, {
            "parent_fingerprint": self.embedder.fingerprint,
            "tokenizer_hash": self.embedder.tokenizer_hash,
            "max_length": self.embedder.max_length,
            "training_data_hash": examples.source_hash,
            "metrics": trained.metrics,
            "validation": report.to_dict(),
            "training_cache": batch.cache_report(),
            "library_versions": library_versions(),
            "git_commit": git_commit(),
        })
        self._unload_unaliased(tenant, name)
        return manifest

    def _unload_unaliased(self, tenant: str, name: str) -> None:
        """Drop loaded versions of ``name`` that no alias points at any more (a request naming
        one explicitly loads it again)."""
        try:
            keep = {f"{tenant}/{name}@{v}" for v in self.registry.aliases(tenant, name).values()}
        except NotFoundError:
            keep = set()
        prefix = f"{tenant}/{name}@"
        with self._lock:
            for key in self.fleet.keys():
                if key.startswith(prefix) and key not in keep:
                    self.fleet.remove(key)

    def delete(self, tenant: str, name: str) -> None:
        """Remove a classifier with all its versions, and unload its heads."""
        check_name(name, "classifier name")
        self.registry.delete(tenant, name)
        self._resolved = {k: v for k, v in self._resolved.items() if k[0] != tenant or k[1].partition("@")[0] != name}
        self._unload_unaliased(tenant, name)

    def tenant_stats(self, tenant: str) -> dict:
        return self.stats.snapshot(tenant)

    def health(self) -> dict:
        status = self.redis.status() if self.redis is not None else None
        if status is not None and not status["healthy"]:
            return {"status": "degraded", "reason": f"redis unreachable: {status['last_error']}"}
        return {"status": "ready"}
