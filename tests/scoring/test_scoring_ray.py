"""``--engine ray`` on a local Ray instance: the same output, rejects and counts as the local engine;
Redis is the cache its actors share, so re-scoring with a new classifier embeds nothing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from headfleet.scoring import JobSpec, ScoreJob, SourceSpec
from headfleet.scoring.ray_engine import run_ray
from headfleet.engine import Engine
from headfleet.settings import Settings
from scoring_stores import rows_by_id

import ray  # noqa: E402  (a declared test extra: missing is a collection error, not a skip)

TENANT = "acme"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def make_job(data_dir, source, out, classifiers=("spam", "urgency"), **kw) -> ScoreJob:
    from headfleet.heads import Registry

    return ScoreJob(JobSpec(SourceSpec(str(source)), out, TENANT, tuple(classifiers), chunk_rows=32),
                    resolve=Registry(data_dir / "registry").resolve, **kw)


def test_ray_engine_matches_the_local_engine_and_shares_the_cache_through_redis(
        local_ray, minilm, data_dir, sms_docs, redis_server, tmp_path):
    docs = sms_docs[:90]
    store = tmp_path / "store"
    store.mkdir()
    for i, part in enumerate((docs[:50], docs[50:])):
        ids = [d for d, _ in part] + [None]
        texts = [t for _, t in part] + ["a row without an id"]
        pq.write_table(pa.table({"id": ids, "text": texts}), store / f"part-{i}.parquet")

    local_settings = Settings(data_dir=data_dir, device="cpu", faiss_store=False)
    with Engine.open(local_settings, minilm) as engine:
        local = make_job(data_dir, store, tmp_path / "local.jsonl").run(engine.classify)

    settings = Settings(data_dir=data_dir, device="cpu", faiss_store=False, redis_url=redis_server.url)
    remote = run_ray(make_job(data_dir, store, tmp_path / "ray.jsonl", engine="ray"), settings, Engine.open,
                     actors=2)

    ours, theirs = rows_by_id(tmp_path / "local.jsonl"), rows_by_id(tmp_path / "ray.jsonl")
    assert list(theirs) == list(ours) == [d for d, _ in docs]
    for doc_id, row in ours.items():
        for c in ("spam", "urgency"):
            assert theirs[doc_id][c]["label"] == row[c]["label"]
            assert theirs[doc_id][c]["score"] == pytest.approx(row[c]["score"], abs=1e-5)
            assert theirs[doc_id][c]["version"] == row[c]["version"] == 1
    for key in ("documents", "scored", "rejected", "rejects_by_reason", "labels", "classifiers"):
        assert remote[key] == local[key], key
    assert remote["rejects_by_reason"] == {"missing id": 2}
    assert [json.loads(x)["file"] for x in (tmp_path / "ray.rejects.jsonl").read_text().splitlines()] == \
        ["part-0.parquet", "part-1.parquet"]
    assert remote["embeddings_computed"] == len(docs) and remote["backbone_forwards"]["measured"]

    # tomorrow: one new classifier, a new pool of actors with empty memory — Redis answers every text
    again = run_ray(make_job(data_dir, store, tmp_path / "urgency.parquet", classifiers=("urgency",), engine="ray"),
                    settings, Engine.open, actors=2)
    assert again["embeddings_computed"] == 0 and again["backbone_forwards"]["run"] == 0
    assert again["cache"]["hits"]["redis"] == len(docs) and again["cache"]["hit_rate"] == 1.0
    assert len(rows_by_id(tmp_path / "urgency.parquet")) == len(docs)
