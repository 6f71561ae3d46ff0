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
from headfleet.errors import ValidationError
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
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: Settings | None = None, embedder: Embedder | None = None) -> "Engine":
        """Bring up backbone -> local store -> Redis; ``embedder`` lets several engines share one backbone."""
        settings = settings or Settings.from_env()
        data = Path(settings.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        embedder = embedder or Embedder.load(settings.model_path, max_length=settings.max_length,
                                 batch_size=settings.batch_size, device=settings.device, threads=settings.threads)
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

    def embed(self, tenant: str, texts: Sequence[str], *, namespace: str | None = None,
              classifiers: Sequence[str] = (), progress: Callable[[int], None] | None = None) -> EmbedBatch:
        """Vectors for ``texts``: cache tiers first, the backbone for the distinct misses only."""
        t0 = time.perf_counter()
        ns = self.namespace_for(tenant, namespace)
        norm = [normalise_text(t) for t in texts]
        fp, max_len = self.embedder.fingerprint, self.embedder.max_length
        keys = [content_key(fp, ns, max_len, t) for t in norm]
        found = self.cache.lookup(keys, tenant, classifiers, namespaces=[ns] * len(keys))
        t1 = time.perf_counter()
        vectors = np.empty((len(texts), self.embedder.dim), dtype=np.float32)
        truncated = np.zeros(len(texts), dtype=bool)
        todo: dict[bytes, list[int]] = {}  # a text repeated inside one call is embedded once
        for i, v in enumerate(found.vectors):
            if v is None:
                todo.setdefault(keys[i], []).append(i)
            else:
                vectors[i] = v
        n_miss = sum(map(len, todo.values()))
        if progress is not None and len(texts) > n_miss:
            progress(len(texts) - n_miss)
        hit_rows = [i for i, v in enumerate(found.vectors) if v is not None
                    and len(norm[i]) * _CHARS_PER_TOKEN_FLOOR + 2 > max_len]
        if hit_rows:
            truncated[hit_rows] = self.embedder.count_tokens([norm[i] for i in hit_rows]).truncated
        computed = 0
        if todo:
            first = [rows[0] for rows in todo.values()]
            out = self.embedder.embed([norm[i] for i in first], progress=progress)
            if progress is not None and n_miss > len(first):
                progress(n_miss - len(first))  # in-call repeats of texts just computed
            for j, rows in enumerate(todo.values()):
                vectors[rows] = out.vectors[j]
                truncated[rows] = out.truncated[j]
            computed = len(first)
            self.stats.record_computed(tenant, computed)
            self.cache.store(list(todo.keys()), out.vectors, [ns] * computed)
        t2 = time.perf_counter()
        return EmbedBatch(vectors, list(found.tiers), truncated, computed,
                          {"cache": (t1 - t0) * 1e3, "embed": (t2 - t1) * 1e3})

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
            st = os.stat(self.registry.root / tenant / name / "aliases.json")
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

    def classify(self, tenant: str, texts: Sequence[str], classifiers: Sequence[str], *,
                 namespace: str | None = None, progress: Callable[[int], None] | None = None) -> dict:
        """Every text against every classifier: label, scores, version; and the cache report."""
        if not texts:
            raise ValidationError("texts must hold at least one text")
        if not classifiers:
            raise ValidationError("classifiers must name at least one classifier")
        refs = list(dict.fromkeys(classifiers))
        resolved = [self._fleet_key(tenant, r) for r in refs]
        names = [m["name"] for _, m in resolved]
        batch = self.embed(tenant, texts, namespace=namespace, classifiers=names, progress=progress)
        t0 = time.perf_counter()
        out = self.fleet.predict(batch.vectors, [k for k, _ in resolved])
        results = []
        for i in range(len(texts)):
            per = {}
            for j, (ref, (_, m)) in enumerate(zip(refs, resolved)):
                labels = out.labels[j]
                p = out.probs[i, j, : len(labels)]
                entry = {"classifier": m["id"], "version": m["version"],
                         "scores": {lab: round(float(x), 6) for lab, x in zip(labels, p)}}
                if out.multi_label[j]:
                    entry["labels"] = [lab for lab, x in zip(labels, p) if x >= 0.5]
                else:
                    entry["label"] = labels[int(np.argmax(p))]
                per[ref] = entry
            results.append({"index": i, "truncated": bool(batch.truncated[i]), "cache": batch.tiers[i] or "miss",
                            "classifications": per})
        timing = dict(batch.timing_ms, heads=(time.perf_counter() - t0) * 1e3)
        return {"results": results, "cache": batch.cache_report(),
                "timing_ms": {k: round(v, 3) for k, v in timing.items()}}

    def train(self, tenant: str, name: str, examples: Examples, *, kind: str = "logreg", seed: int = 0,
              progress: Callable[[int], None] | None = None) -> dict:
        """Validate, embed through the cache, fit, save a new immutable version; returns its manifest."""
        check_name(name, "classifier name")
        counts = self.embedder.count_tokens([normalise_text(t) for t in examples.texts]) if examples.texts else None
        stats = None
        if counts is not None:
            stats = TokenStats(unk_share=float(counts.n_unk.sum() / max(1, counts.n_tokens.sum())),
                               truncated_share=float(counts.truncated.mean()))
        report = validate(examples, stats)
        batch = self.embed(tenant, examples.texts, progress=progress)
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
        return manifest

    def tenant_stats(self, tenant: str) -> dict:
        return self.stats.snapshot(tenant)

    def health(self) -> dict:
        status = self.redis.status() if self.redis is not None else None
        if status is not None and not status["healthy"]:
            return {"status": "degraded", "reason": f"redis unreachable: {status['last_error']}"}
        return {"status": "ready"}
