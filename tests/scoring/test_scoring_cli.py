"""``headfleet score`` options and errors as a user meets them (in process, sharing the loaded backbone)."""

from __future__ import annotations

import json

import pytest

from headfleet.service import cli
from scoring_stores import rows_by_id, write_csv


@pytest.fixture
def run(minilm, data_dir, monkeypatch, capsys):
    import headfleet.engine.engine as engine_mod

    real_open = engine_mod.Engine.open.__func__
    monkeypatch.setattr(engine_mod.Engine, "open",
                        classmethod(lambda cls, settings=None, embedder=None: real_open(cls, settings, minilm)))

    def _run(*args):
        code = cli.main([*args, "--data-dir", str(data_dir), "--tenant", "acme"])
        out = capsys.readouterr()
        return code, out.out, out.err

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
