"""Stores of documents in every format a scoring job reads, written the way users' tools write them."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from headfleet.scoring import read_output


def write_jsonl(path: Path, docs, *, id_col="id", text_col="text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text in docs:
            f.write(json.dumps({id_col: doc_id, text_col: text}) + "\n")
    return path


def write_csv(path: Path, docs, *, id_col="id", text_col="text") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([id_col, "channel", text_col])
        for doc_id, text in docs:
            w.writerow([doc_id, "sms", text])
    return path


def write_parquet(path: Path, docs, *, id_col="id", text_col="text", row_group_size=None) -> Path:
    table = pa.table({id_col: [d for d, _ in docs], "lang": ["en"] * len(docs), text_col: [t for _, t in docs]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_sqlite(path: Path, docs, *, table="tickets", id_type="TEXT") -> Path:
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE {table} (id {id_type}, body TEXT, text TEXT)")
    conn.executemany(f"INSERT INTO {table} (id, body, text) VALUES (?, '', ?)", list(docs))
    conn.commit()
    conn.close()
    return path


def rows_by_id(path: Path) -> dict:
    """A finished output as {id: row}, failing on a duplicate id (every document exactly once)."""
    out = {}
    for row in read_output(path):
        assert row["id"] not in out, f"document {row['id']!r} appears twice in {path}"
        out[row["id"]] = row
    return out
