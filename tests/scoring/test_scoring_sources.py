"""Every store a user points a job at — JSONL, CSV, Parquet (files and folders), SQLite — gives the
same labels as classifying the texts directly; bad rows are counted, written to the rejects file
with the reason, and the job goes on."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from headfleet.errors import ForbiddenError, NotFoundError, ValidationError
from headfleet.scoring import JobSpec, ScoreJob, SourceSpec
from headfleet.engine import Engine
from headfleet.settings import Settings
from scoring_stores import rows_by_id, write_csv, write_jsonl, write_parquet, write_sqlite

TENANT = "acme"


@pytest.fixture(scope="module")
def engine(minilm, trained_registry, tmp_path_factory):
    """One engine for the module: the reference classify warms its memory tier, so the jobs below
    read the same vectors and must give exactly the same scores."""
    import shutil

    data = tmp_path_factory.mktemp("sources-data")
    shutil.copytree(trained_registry, data / "registry")
    with Engine.open(Settings(data_dir=data, device="cpu", faiss_store=False), minilm) as e:
        yield e


@pytest.fixture(scope="module")
def docs(sms_docs):
    return sms_docs[:120]


@pytest.fixture(scope="module")
def reference(engine, docs) -> dict:
    out = engine.classify(TENANT, [t for _, t in docs], ["spam", "urgency"])
    return {doc_id: r["classifications"] for (doc_id, _), r in zip(docs, out["results"])}


def run_job(engine, source: Path, out: Path, **spec) -> dict:
    src = SourceSpec(str(source), **{k: spec.pop(k) for k in ("id_col", "text_col", "table") if k in spec})
    job = ScoreJob(JobSpec(src, out, TENANT, ("spam", "urgency"), chunk_rows=spec.pop("chunk_rows", 50), **spec),
                   resolve=engine.registry.resolve)
    return job.run(engine.classify, forwards=lambda: engine.embedder.forwards)


def _split(docs, n):
    k = len(docs) // n + 1
    return [docs[i:i + k] for i in range(0, len(docs), k)]


STORES = ["jsonl", "csv", "parquet", "sqlite", "parquet-folder", "csv-folder", "jsonl-folder"]


def make_store(kind: str, d: Path, docs) -> Path:
    """One store of ``docs``; folders split them over several files (a subfolder for CSV)."""
    if kind == "jsonl":
        return write_jsonl(d / "docs.jsonl", docs)
    if kind == "csv":
        return write_csv(d / "docs.csv", docs)
    if kind == "parquet":
        return write_parquet(d / "docs.parquet", docs, row_group_size=32)
    if kind == "sqlite":
        return write_sqlite(d / "docs.db", docs)
    folder = d / "store"
    inner = folder / "2024" if kind == "csv-folder" else folder
    inner.mkdir(parents=True)
    write = {"parquet-folder": write_parquet, "csv-folder": write_csv, "jsonl-folder": write_jsonl}[kind]
    suffix = kind.split("-")[0]
    for i, part in enumerate(_split(docs, 3)):
        write(inner / f"part-{i:02d}.{suffix}", part)
    return folder


@pytest.mark.parametrize("fmt_out", ["parquet", "jsonl"])
@pytest.mark.parametrize("store", STORES)
def test_every_store_scores_every_document_like_classify(engine, docs, reference, tmp_path, store, fmt_out):
    source = make_store(store, tmp_path, docs)
    out = tmp_path / f"scores.{fmt_out}"
    report = run_job(engine, source, out)
    rows = rows_by_id(out)
    assert list(rows) == [d for d, _ in docs]  # every document once, in the store's order
    for doc_id, row in rows.items():
        for c in ("spam", "urgency"):
            want = reference[doc_id][c]
            # the heads' batched matmul rounds differently for another batch shape: the 6th decimal may move
            assert row[c] == {"label": want["label"], "score": pytest.approx(want["scores"][want["label"]], abs=2e-6),
                              "version": 1}
        assert row["truncated"] is False
    assert report["documents"] == report["scored"] == len(docs) and report["rejected"] == 0
    assert sum(report["labels"]["spam"].values()) == len(docs)
    assert (tmp_path / "scores.rejects.jsonl").read_text() == ""
    assert json.loads((tmp_path / "scores.report.json").read_text())["scored"] == len(docs)
    assert not (tmp_path / f"scores.{fmt_out}.partial").exists()


def test_integer_ids_stay_integers(engine, docs, tmp_path):
    int_docs = [(1000 + i, t) for i, (_, t) in enumerate(docs[:20])]
    write_parquet(tmp_path / "a.parquet", int_docs)
    write_sqlite(tmp_path / "b.db", int_docs, id_type="INTEGER")
    for name in ("a.parquet", "b.db"):
        run_job(engine, tmp_path / name, tmp_path / f"{name}.out.parquet")
        assert pq.read_schema(tmp_path / f"{name}.out.parquet").field("id").type == pa.int64()
        assert list(rows_by_id(tmp_path / f"{name}.out.parquet")) == [d for d, _ in int_docs]


def test_custom_columns_and_named_sqlite_table(engine, docs, reference, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", docs[:10], id_col="ticket", text_col="body")
    run_job(engine, tmp_path / "t.jsonl", tmp_path / "t.parquet", id_col="ticket", text_col="body")
    assert list(rows_by_id(tmp_path / "t.parquet")) == [d for d, _ in docs[:10]]
    db = write_sqlite(tmp_path / "two.db", docs[:10], table="tickets")
    write_sqlite(db, docs[10:12], table="archive")
    with pytest.raises(ValidationError, match="2 tables"):
        run_job(engine, db, tmp_path / "x.parquet")
    run_job(engine, db, tmp_path / "y.parquet", table="archive")
    assert list(rows_by_id(tmp_path / "y.parquet")) == [d for d, _ in docs[10:12]]


def test_jsonl_bad_rows_are_rejected_with_their_reason_and_the_job_goes_on(engine, docs, reference, tmp_path):
    good = docs[:6]
    lines = [json.dumps({"id": good[0][0], "text": good[0][1]}).encode(),
             json.dumps({"id": "no-text"}).encode(),
             json.dumps({"id": "blank", "text": "   \n "}).encode(),
             json.dumps({"id": good[1][0], "text": good[1][1]}).encode(),
             json.dumps({"text": "a text without an id"}).encode(),
             json.dumps({"id": "", "text": "an empty id"}).encode(),
             b'{"id": "broken", "text": "unterminated',
             b"",  # a blank line is not a document
             b'{"id": "latin1", "text": "caf\xe9 cr\xe8me"}',
             json.dumps({"id": "number", "text": 42}).encode(),
             json.dumps({"id": "null", "text": None}).encode(),
             b'["an", "array"]',
             *[json.dumps({"id": d, "text": t}).encode() for d, t in good[2:]]]
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = run_job(engine, tmp_path / "docs.jsonl", tmp_path / "out.jsonl", chunk_rows=4)
    assert list(rows_by_id(tmp_path / "out.jsonl")) == [d for d, _ in good]
    assert report["scored"] == 6 and report["rejected"] == 9 and report["documents"] == 15
    assert report["rejects_by_reason"] == {"missing text": 2, "empty text": 1, "missing id": 2, "invalid JSON": 1,
                                           "undecodable bytes": 1, "text is not a string": 1,
                                           "not a JSON object": 1}
    rejects = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "missing text"), (3, "empty text"), (5, "missing id"), (6, "missing id"), (7, "invalid JSON"),
        (9, "undecodable bytes"), (10, "text is not a string"), (11, "missing text"), (12, "not a JSON object")]
    assert rejects[5]["raw"] == '{"id": "latin1", "text": "caf\\xe9 cr\\xe8me"}'  # the bytes, shown escaped
    assert rejects[1]["raw"] == "   \n "  # an empty text shows what it held
    assert all(r["file"] == "docs.jsonl" for r in rejects)


def test_csv_parquet_sqlite_bad_rows(engine, docs, tmp_path):
    (tmp_path / "docs.csv").write_bytes(
        b"id,text\n"
        + b"a,Claim your free prize now\n"
        + b"b,caf\xe9\n"  # not UTF-8
        + b"c,\n"  # empty text
        + b",orphan text\n"  # no id
        + b"d,too,many,fields\n"  # malformed record
        + b'e,"The database is down, every customer is affected"\n')
    report = run_job(engine, tmp_path / "docs.csv", tmp_path / "csv.parquet")
    assert list(rows_by_id(tmp_path / "csv.parquet")) == ["a", "e"]
    assert report["rejects_by_reason"] == {"undecodable bytes": 1, "empty text": 1, "missing id": 1,
                                           "malformed CSV record": 1}

    pq.write_table(pa.table({"id": ["p1", None, "p3", "p4"], "text": [docs[2][1], docs[3][1], None, ""]}),
                   tmp_path / "docs.parquet")
    report = run_job(engine, tmp_path / "docs.parquet", tmp_path / "pq.parquet")
    assert list(rows_by_id(tmp_path / "pq.parquet")) == ["p1"]
    assert report["rejects_by_reason"] == {"missing id": 1, "missing text": 1, "empty text": 1}

    conn = sqlite3.connect(tmp_path / "docs.db")
    conn.execute("CREATE TABLE t (id TEXT, text TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [("s1", docs[4][1]), ("s2", None), (None, docs[5][1])])
    conn.execute("INSERT INTO t VALUES ('s4', CAST(x'ff6f6f' AS TEXT))")  # invalid UTF-8 stored as TEXT
    conn.commit()
    conn.close()
    report = run_job(engine, tmp_path / "docs.db", tmp_path / "db.parquet")
    assert list(rows_by_id(tmp_path / "db.parquet")) == ["s1"]
    assert report["rejects_by_reason"] == {"missing text": 1, "missing id": 1, "undecodable bytes": 1}
    rejects = [json.loads(line) for line in (tmp_path / "db.rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r.get("id")) for r in rejects] == [(1, "s2"), (2, None), (3, "s4")]


def test_unusable_sources_are_refused_before_any_work(engine, docs, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", docs[:3])
    with pytest.raises(NotFoundError, match="does not exist"):
        run_job(engine, tmp_path / "nope.jsonl", tmp_path / "o.parquet")
    write_csv(tmp_path / "c.csv", docs[:3])
    with pytest.raises(ValidationError, match="no text column 'body'.*--text-col"):
        run_job(engine, tmp_path / "c.csv", tmp_path / "o.parquet", text_col="body")
    write_parquet(tmp_path / "p.parquet", docs[:3])
    with pytest.raises(ValidationError, match="no id column 'doc_id'"):
        run_job(engine, tmp_path / "p.parquet", tmp_path / "o.parquet", id_col="doc_id")
    (tmp_path / "mixed").mkdir()
    write_csv(tmp_path / "mixed" / "a.csv", docs[:2])
    write_jsonl(tmp_path / "mixed" / "b.jsonl", docs[:2])
    with pytest.raises(ValidationError, match="mixes csv, jsonl"):
        run_job(engine, tmp_path / "mixed", tmp_path / "o.parquet")
    with pytest.raises(ValidationError, match="output format"):
        run_job(engine, tmp_path / "a.jsonl", tmp_path / "o.txt")
    with pytest.raises(NotFoundError, match="nope"):
        ScoreJob(JobSpec(SourceSpec(str(tmp_path / "a.jsonl")), tmp_path / "o.parquet", TENANT, ("nope",)),
                 resolve=engine.registry.resolve)
    assert not any(p.name.startswith("o.") for p in tmp_path.iterdir())  # nothing half-written


def test_a_bom_and_crlf_line_ends_lose_no_document(engine, docs, tmp_path):
    """What Windows tools write: a UTF-8 BOM before the first record, CRLF after every one."""
    few = docs[:30]
    lines = [json.dumps({"id": d, "text": t}, ensure_ascii=False) for d, t in few]
    (tmp_path / "docs.jsonl").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    with open(tmp_path / "docs.csv", "w", newline="", encoding="utf-8-sig") as f:  # utf-8-sig writes the BOM
        w = csv.writer(f, lineterminator="\r\n")
        w.writerow(["id", "text"])
        w.writerows(few)
    for name in ("docs.jsonl", "docs.csv"):
        report = run_job(engine, tmp_path / name, tmp_path / f"{name}.parquet", chunk_rows=7)
        assert report["rejected"] == 0 and report["scored"] == len(few), (name, report["rejects_by_reason"])
        assert list(rows_by_id(tmp_path / f"{name}.parquet")) == [d for d, _ in few]


def test_invisible_texts_and_lone_surrogates_are_rejects_with_their_reason(engine, docs, tmp_path):
    lines = [json.dumps({"id": "good", "text": docs[0][1]}),
             '{"id": "zero-width", "text": "\\u200b\\u2060\\ufeff"}',
             '{"id": "surrogate", "text": "\\ud83d"}',
             '{"id": "\\ude00", "text": "an id that is half a character"}',
             json.dumps({"id": "pair", "text": "\U0001F600 " + docs[1][1]})]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = run_job(engine, tmp_path / "docs.jsonl", tmp_path / "out.jsonl")
    assert list(rows_by_id(tmp_path / "out.jsonl")) == ["good", "pair"]
    assert report["rejects_by_reason"] == {"no visible content": 1, "text is not valid Unicode (lone surrogate)": 1,
                                           "id is not valid Unicode (lone surrogate)": 1}
    rejects = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text("utf-8").splitlines()]
    assert [(r["line"], r.get("id")) for r in rejects] == [(2, "zero-width"), (3, "surrogate"), (4, None)]


def test_a_confined_job_fails_on_a_link_swapped_in_while_it_runs_and_reads_none_of_it(engine, docs, tmp_path):
    root = tmp_path / "scoring"
    (root / "a").mkdir(parents=True)
    (root / "b" / "dir").mkdir(parents=True)
    secret = "tenant a's private text, never to be read for b"
    write_jsonl(root / "a" / "docs.jsonl", [(f"a-{i}", secret) for i in range(5)])
    write_jsonl(root / "b" / "dir" / "0.jsonl", docs[:40])
    write_jsonl(root / "b" / "dir" / "1.jsonl", docs[40:50])
    out = root / "b" / "scores.jsonl"
    job = ScoreJob(JobSpec(SourceSpec(str(root / "b" / "dir")), out, TENANT, ("spam",), chunk_rows=20,
                           root=root / "b"), resolve=engine.registry.resolve)

    def swap(job, chunk):
        if chunk.key == (0, 0):
            tmp = root / "b" / "dir" / "1.swap"
            tmp.symlink_to("../../a/docs.jsonl")
            os.replace(tmp, root / "b" / "dir" / "1.jsonl")

    with pytest.raises(ForbiddenError) as exc:
        job.run(engine.classify, on_commit=swap)
    assert "'dir/1.jsonl' leads outside" in exc.value.message and str(root) not in exc.value.message
    assert job.counts["documents"] == 40  # file 0 was scored; nothing of file 1
    written = b"".join(p.read_bytes() for p in (root / "b").rglob("*") if p.is_file() and not p.is_symlink())
    assert secret.encode() not in written and not out.exists()
