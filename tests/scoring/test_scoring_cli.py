"""``headfleet score`` options and errors as a user meets them: the command in its own process
(the scoring package is tested without importing the service)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scoring_stores import rows_by_id, write_csv


@pytest.fixture
def run(data_dir):
    def _run(*args):
        done = subprocess.run([sys.executable, "-m", "headfleet.service.cli", *args, "--data-dir", str(data_dir),
                               "--tenant", "acme"], capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
        return done.returncode, done.stdout, done.stderr

    return _run


def test_score_csv_with_named_columns_to_jsonl_with_a_json_report(run, sms_docs, tmp_path):
    write_csv(tmp_path / "t.csv", sms_docs[:25], id_col="ticket_id", text_col="body")
    code, out, _ = run("score", "--source", str(tmp_path / "t.csv"), "-c", "spam", "-c", "urgency@1",
                       "--id-col", "ticket_id", "--text-col", "body", "--out", str(tmp_path / "scores.out"),
                       "--format", "jsonl", "--rejects", str(tmp_path / "bad.jsonl"), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["scored"] == 25 and report["classifiers"] == {"spam": "spam@1", "urgency@1": "urgency@1"}
    rows = [json.loads(line) for line in (tmp_path / "scores.out").read_text().splitlines()]  # JSONL, by --format
    rows = {r["id"]: r for r in rows}
    assert list(rows) == [d for d, _ in sms_docs[:25]]
    assert set(rows[sms_docs[0][0]]) == {"id", "truncated", "spam", "urgency@1"}
    assert (tmp_path / "bad.jsonl").exists()


def test_score_errors_exit_2_with_the_reason(run, sms_docs, tmp_path):
    write_csv(tmp_path / "t.csv", sms_docs[:3])
    code, _, err = run("score", "--source", str(tmp_path / "t.csv"), "-c", "spam", "--text-col", "body",
                       "--out", str(tmp_path / "o.parquet"))
    assert code == 2 and "error (validation_error)" in err and "no text column 'body'" in err
    code, _, err = run("score", "--source", str(tmp_path / "t.csv"), "-c", "legal", "--out", str(tmp_path / "o.parquet"))
    assert code == 2 and "error (not_found)" in err and "legal" in err
    code, _, _ = run("score", "--source", str(tmp_path / "t.csv"), "-c", "spam", "--out", str(tmp_path / "o.parquet"))
    assert code == 0 and len(rows_by_id(tmp_path / "o.parquet")) == 3
    code, _, err = run("score", "--source", str(tmp_path / "t.csv"), "-c", "urgency", "--out", str(tmp_path / "o.parquet"))
    assert code == 2 and "error (conflict)" in err and "--overwrite" in err
