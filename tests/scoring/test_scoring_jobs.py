"""A job's life: re-scoring with a new classifier runs no backbone forward; an interrupted job resumes
where it stopped, with the versions it started with, and writes every document exactly once; a
finished job is not redone; another job's partial output or a finished file is never clobbered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from headfleet.errors import ConflictError, ValidationError
from headfleet.heads import load_examples
from headfleet.scoring import JobSpec, ScoreJob, SourceSpec
from scoring_stores import rows_by_id, write_jsonl

TENANT = "acme"
EXAMPLES = Path(__file__).resolve().parents[2] / "engine" / "example_data"


class Crash(Exception):
    """Stands in for the process dying right after a commit."""


def make_job(engine, source, out, classifiers=("spam",), chunk_rows=20, **kw) -> ScoreJob:
    return ScoreJob(JobSpec(SourceSpec(str(source)), out, TENANT, tuple(classifiers), chunk_rows=chunk_rows),
                    resolve=engine.registry.resolve, batch_size=engine.embedder.batch_size, **kw)


class Counting:
    """engine.classify, counting the texts it was asked for."""

    def __init__(self, engine):
        self.engine, self.texts = engine, 0

    def __call__(self, tenant, texts, classifiers, **kw):
        self.texts += len(texts)
        return self.engine.classify(tenant, texts, classifiers, **kw)


def test_rescoring_with_a_new_classifier_runs_no_backbone_forward(open_engine, sms_docs, tmp_path):
    docs = sms_docs[:150]
    store = write_jsonl(tmp_path / "tickets.jsonl", docs)
    first = open_engine()
    cold = make_job(first, store, tmp_path / "day1.parquet").run(first.classify,
                                                                  forwards=lambda: first.embedder.forwards)
    assert cold["embeddings_computed"] == len(docs) and cold["backbone_forwards"]["run"] > 0
    first.close()  # the local vector store is saved: tomorrow is another process

    engine = open_engine()
    before = engine.embedder.forwards
    report = make_job(engine, store, tmp_path / "day2.parquet", classifiers=("urgency",)).run(
        engine.classify, forwards=lambda: engine.embedder.forwards)
    assert engine.embedder.forwards == before  # not one forward pass
    assert report["embeddings_computed"] == 0
    assert report["backbone_forwards"] == {"run": 0, "saved": cold["backbone_forwards"]["run"], "measured": True}
    assert report["cache"]["hits"]["local"] == len(docs) and report["cache"]["hit_rate"] == 1.0
    assert sum(report["labels"]["urgency"].values()) == len(docs)
    rows = rows_by_id(tmp_path / "day2.parquet")
    assert list(rows) == [d for d, _ in docs] and all(r["urgency"]["version"] == 1 for r in rows.values())


def test_a_document_whose_lora_embedding_was_computed_but_shared_one_held_counts_as_partial(
        open_engine, sms_docs, tmp_path, random_lora):
    """A LoRA classifier reads its own embedding beside the shared one: a document whose shared
    embedding was cached and whose adapter embedding was computed is neither a hit nor a miss."""
    from headfleet.scoring.report import format_report

    engine = open_engine()
    random_lora(engine, TENANT, "lora-spam")
    docs = sms_docs[:30]
    try:
        engine.classify(TENANT, [t for _, t in docs[:12]], ["spam"])  # the shared embeddings of 12 documents
        report = make_job(engine, write_jsonl(tmp_path / "mixed.jsonl", docs), tmp_path / "mixed.parquet",
                          classifiers=("spam", "lora-spam")).run(engine.classify)
        assert report["cache"]["partial"] == 12 and report["cache"]["misses"] == len(docs) - 12
        assert sum(report["cache"]["hits"].values()) == 0 and report["cache"]["hit_rate"] == 0.0
        assert "partial: 12" in format_report(report)
        again = make_job(engine, write_jsonl(tmp_path / "again.jsonl", docs), tmp_path / "again.parquet",
                         classifiers=("spam", "lora-spam")).run(engine.classify)
        assert again["cache"]["hits"]["memory"] == len(docs) and again["cache"]["partial"] == 0
        assert "partial" not in format_report(again).split("hit rate")[0]
    finally:  # the adapter slots live on the session's shared backbone: leave them as found
        if engine.adapters is not None:
            engine.adapters.forget_matching(lambda aid: aid.startswith(f"{TENANT}/lora-spam@"))


def test_an_interrupted_job_resumes_after_its_last_commit_exactly_once(open_engine, sms_docs, tmp_path):
    docs = sms_docs[:100]
    store = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "scores.jsonl"
    engine = open_engine()

    def crash_after_two(job, chunk):
        if job.cursor[1] == 2:
            raise Crash

    with pytest.raises(Crash):
        make_job(engine, store, out).run(engine.classify, on_commit=crash_after_two)
    assert not out.exists()
    partial = tmp_path / "scores.jsonl.partial"
    # the process also died after writing the third chunk's part, before its checkpoint
    shutil.copy(partial / "parts" / "000000-000000001.jsonl", partial / "parts" / "000000-000000002.jsonl")

    job = make_job(engine, store, out)
    assert job.state == "resume" and job.counts["documents"] == 40 and job.dropped_parts == 1
    counting = Counting(engine)
    report = job.run(counting)
    assert counting.texts == 60  # only what was not committed
    rows = rows_by_id(out)  # fails on any document written twice
    assert list(rows) == [d for d, _ in docs]
    assert report["documents"] == report["scored"] == 100 and report["runs"] == 2 and report["resumed_at"] == 40
    assert not partial.exists()


def test_a_resumed_job_keeps_the_versions_it_started_with(open_engine, sms_docs, tmp_path):
    store = write_jsonl(tmp_path / "docs.jsonl", sms_docs[:60])
    out = tmp_path / "scores.parquet"
    engine = open_engine()

    def crash(job, chunk):
        raise Crash

    with pytest.raises(Crash):
        make_job(engine, store, out).run(engine.classify, on_commit=crash)
    engine.train(TENANT, "spam", load_examples(EXAMPLES / "spam.csv"), seed=7)  # spam@2 is now "latest"
    assert engine.registry.resolve(TENANT, "spam")["version"] == 2
    report = make_job(engine, store, out).run(engine.classify)
    assert report["classifiers"] == {"spam": "spam@1"}
    assert {r["spam"]["version"] for r in rows_by_id(out).values()} == {1}


def test_a_finished_job_is_not_redone_and_outputs_are_not_clobbered(open_engine, sms_docs, tmp_path):
    docs = sms_docs[:30]
    store = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "scores.parquet"
    engine = open_engine()
    first = make_job(engine, store, out).run(engine.classify)

    again = make_job(engine, store, out)  # the same command once more
    counting = Counting(engine)
    assert again.state == "done" and again.run(counting) == first and counting.texts == 0

    with pytest.raises(ConflictError, match="already exists; pass --overwrite"):
        make_job(engine, store, out, classifiers=("urgency",))
    report = make_job(engine, store, out, classifiers=("urgency",), overwrite=True).run(engine.classify)
    assert report["classifiers"] == {"urgency": "urgency@1"}
    assert set(next(iter(rows_by_id(out).values()))) == {"id", "truncated", "urgency"}


def test_another_jobs_partial_output_is_refused_until_restart(open_engine, sms_docs, tmp_path):
    store = write_jsonl(tmp_path / "docs.jsonl", sms_docs[:40])
    out = tmp_path / "scores.parquet"
    engine = open_engine()

    def crash(job, chunk):
        raise Crash

    with pytest.raises(Crash):
        make_job(engine, store, out).run(engine.classify, on_commit=crash)
    with pytest.raises(ConflictError, match="classifiers differs.*--restart"):
        make_job(engine, store, out, classifiers=("spam", "urgency"))
    write_jsonl(store, sms_docs[:41])  # the store changed under the partial output
    with pytest.raises(ConflictError, match="the source changed"):
        make_job(engine, store, out)
    report = make_job(engine, store, out, restart=True).run(engine.classify)
    assert report["documents"] == 41 and report["runs"] == 1
    assert len(rows_by_id(out)) == 41


def test_classifier_names_that_collide_with_output_columns_are_refused(open_engine, sms_docs, tmp_path):
    engine = open_engine()
    store = write_jsonl(tmp_path / "docs.jsonl", sms_docs[:3])
    with pytest.raises(ValidationError, match="collide with the output column 'id'"):
        make_job(engine, store, tmp_path / "o.parquet", classifiers=("id",))


def test_progress_counts_and_eta_while_running(open_engine, sms_docs, tmp_path):
    store = write_jsonl(tmp_path / "docs.jsonl", sms_docs[:60])
    engine = open_engine()
    seen = []
    job = make_job(engine, store, tmp_path / "o.jsonl")
    assert job.estimate_total() == (60, True)
    job.run(engine.classify, on_commit=lambda j, c: seen.append(j.progress()))
    assert [p["documents"] for p in seen] == [20, 40, 60]
    assert seen[0]["total"] == 60 and seen[-1]["eta_s"] == 0
    for p in seen[:-1]:  # the documents left at this run's rate, as the user reads it
        assert p["docs_per_s"] > 0
        assert p["eta_s"] == pytest.approx((60 - p["documents"]) / p["docs_per_s"], rel=0.02, abs=0.1), p
    assert json.loads((tmp_path / "o.report.json").read_text())["documents"] == 60
