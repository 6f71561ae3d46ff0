"""``--engine ray``: the same job on a Ray cluster — Ray Data reads, an actor pool scores, the driver commits.

    read_datasource(StoreDatasource)      one read task per file, the same readers as the local engine
      -> map_batches(_Scorer, concurrency=N)  each actor holds an engine (backbone + heads) and calls its
                                          classify; Redis is the cache every actor shares
      -> iter_batches (order preserved)   the driver cuts the rows back into the job's chunks and
                                          commits them (parts + checkpoint) exactly as the local engine

So output, rejects, report and resume are the local engine's: a job started with ``--engine ray``
can be finished with ``--engine local`` and the other way round. The actors get the pinned heads
as bytes from the driver (no shared registry folder needed); the source path must be readable by
every worker (a shared filesystem), as with any Ray Data read. Each actor's engine is built by
``engine_factory(settings)`` (the CLI passes ``Engine.open``), so this module never imports the
service.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

from headfleet.heads import Registry
from headfleet.scoring.chunk import ScoredChunk, classify_good, file_starts, scored_chunk
from headfleet.scoring.job import ScoreJob
from headfleet.scoring.sources import Source

log = logging.getLogger(__name__)

READ_CPUS = 0.25  # a read task parses one file; the actors do the heavy work


def _read_file(source: Source, file_index: int, start: int, block_rows: int) -> Iterable:
    """A read task: one file's rows from ``start`` as Arrow blocks of ``block_rows`` rows."""
    import pyarrow as pa

    id_type = pa.int64() if source.id_type == "int64" else pa.string()
    schema = pa.schema([("file", pa.int32()), ("pos", pa.int64()), ("id", id_type), ("text", pa.string()),
                        ("reject", pa.string())])
    buf: list = []

    def block() -> "pa.Table":
        cols = list(zip(*buf))
        rejects = [json.dumps(r, ensure_ascii=False) if r is not None else None for r in cols[3]]
        ids = [i if r is None else None for i, r in zip(cols[1], cols[3])]  # a reject's id is in its record
        return pa.Table.from_arrays([pa.array([file_index] * len(buf), pa.int32()), pa.array(cols[0], pa.int64()),
                                     pa.array(ids, id_type), pa.array(cols[2], pa.string()),
                                     pa.array(rejects, pa.string())], schema=schema)

    for row in source.rows(file_index, start):
        buf.append(row)
        if len(buf) >= block_rows:
            yield block()
            buf = []
    if buf:
        yield block()


def _datasource(source: Source, cursor: tuple[int, int], chunk_rows: int):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class StoreDatasource(Datasource):
        """The store's files from the job's cursor on, one read task per file (files keep their order)."""

        def get_name(self) -> str:
            return f"headfleet-{source.kind}"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            tasks = []
            for fi, start in file_starts(cursor, len(source.files), chunk_rows):
                meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                     input_files=(str(source.files[fi]),))
                tasks.append(ReadTask(partial(_read_file, source, fi, start, chunk_rows), meta))
            return tasks

    return StoreDatasource()


class _Scorer:
    """An actor of the pool: one engine for its life, the pinned heads unpacked into a private registry."""

    def __init__(self, engine_factory: Callable[[Any], Any], settings: Any, tenant: str, pins: dict,
                 namespace: str | None, heads: dict[str, bytes]):
        self.folder = Path(tempfile.mkdtemp(prefix="headfleet-ray-"))
        settings = dataclasses.replace(settings, data_dir=self.folder, faiss_store=False)
        for rel, data in heads.items():
            path = settings.layout.registry / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.engine = engine_factory(settings)
        self.tenant, self.pins, self.namespace = tenant, pins, namespace

    def __call__(self, batch):
        import pyarrow as pa

        texts = batch.column("text").to_pylist()
        rejects = batch.column("reject").to_pylist()
        good = [t for t, r in zip(texts, rejects) if r is None]
        embedder = self.engine.embedder
        results, computed, forwards = classify_good(self.engine.classify, self.tenant, self.pins, good,
                                                    namespace=self.namespace, forwards=lambda: embedder.forwards)
        it = iter(results)
        encoded = [None if r is not None else json.dumps(next(it), ensure_ascii=False) for r in rejects]
        n = batch.num_rows
        first = lambda v: [v] + [0] * (n - 1)  # noqa: E731  batch totals ride on the batch's first row
        return (batch.drop_columns(["text"])
                .append_column("result", pa.array(encoded, pa.string()))
                .append_column("computed", pa.array(first(computed), pa.int64()))
                .append_column("forwards", pa.array(first(forwards or 0), pa.int64())))

    def __del__(self):
        shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True)


def pack_heads(registry: Registry, tenant: str, pins: dict[str, dict]) -> dict[str, bytes]:
    """Every file of every pinned version, keyed by its path under the registry root."""
    heads: dict[str, bytes] = {}
    for p in pins.values():
        manifest = registry.resolve(tenant, p["ref"])
        vdir = registry.version_dir(tenant, manifest)
        for path in sorted(vdir.rglob("*")):
            if path.is_file():
                heads[str(path.relative_to(registry.root))] = path.read_bytes()
    return heads


def drain(job: ScoreJob, batches: Iterable, on_commit: Callable[[ScoreJob, ScoredChunk], None] | None) -> None:
    """Scored rows in source order -> the job's chunks, each committed once all its rows are in."""
    n = job.spec.chunk_rows
    key, rows, results = None, [], []
    computed = forwards = 0

    def commit() -> None:
        chunk = scored_chunk(key, rows, results, computed, forwards, job.pins, job.file_label(key[0]))
        job.commit(chunk)
        if on_commit is not None:
            on_commit(job, chunk)

    for batch in batches:
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            k = (cols["file"][i], cols["pos"][i] // n)
            if k != key and rows:
                commit()
                rows, results, computed, forwards = [], [], 0, 0
            key = k
            reject = json.loads(cols["reject"][i]) if cols["reject"][i] is not None else None
            rows.append((cols["pos"][i], cols["id"][i], None, reject))
            if reject is None:
                results.append(json.loads(cols["result"][i]))
            computed += cols["computed"][i]
            forwards += cols["forwards"][i]
    if rows:
        commit()


def run_ray(job: ScoreJob, settings: Any, engine_factory: Callable[[Any], Any], *, address: str | None = None,
            actors: int | None = None, on_commit: Callable[[ScoreJob, ScoredChunk], None] | None = None) -> dict:
    """Run ``job`` on Ray: a local instance, or the cluster at ``address`` / ``RAY_ADDRESS``; returns the report.

    An already initialised Ray (``ray.init`` by the caller) is used as it is and left running.
    """
    import ray
    import ray.data

    if job.state == "done":
        return job.report
    if not settings.redis_url:
        log.warning("--engine ray without a Redis URL: the actors share no cache, so a re-score embeds again; "
                    "pass --redis-url (or HEADFLEET_REDIS_URL) reachable from every worker")
    started_here = False
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, logging_level=logging.WARNING,
                 log_to_driver=False, include_dashboard=False)
        started_here = True
    try:
        job.begin()
        job.estimate_total()
        if not job.complete:
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True  # chunks are committed in source order
            ctx.enable_progress_bars = False  # the CLI has its own bar
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            cpus = float(ray.cluster_resources().get("CPU", 1))
            n_actors = actors or max(1, int(cpus) - 1)  # a CPU left for the reads
            # every actor holds its CPUs for the whole job: leave room for the read tasks or they never start
            actor_cpus = max(0.1, min(1.0, (cpus - READ_CPUS * 2) / n_actors))
            heads = pack_heads(Registry(settings.layout.registry), job.spec.tenant, job.pins)
            ds = ray.data.read_datasource(_datasource(job.source, job.cursor, job.spec.chunk_rows),
                                          num_cpus=READ_CPUS)
            ds = ds.map_batches(
                _Scorer, batch_format="pyarrow", batch_size=job.spec.chunk_rows, concurrency=n_actors,
                num_cpus=actor_cpus,
                fn_constructor_args=(engine_factory, settings, job.spec.tenant, job.pins, job.spec.namespace,
                                     heads))
            drain(job, ds.iter_batches(batch_format="pyarrow", batch_size=None), on_commit)
        return job.finish()
    finally:
        if started_here:
            ray.shutdown()
