"""``headfleet score`` as a user runs it: ``kill -9`` in the middle, the same command again, and the
output holds every document exactly once, with the labels the classifier gives them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from headfleet.settings import Settings
from headfleet.engine import Engine
from scoring_stores import rows_by_id, write_jsonl

TENANT = "acme"


def test_kill_9_then_the_same_command_finishes_with_every_document_exactly_once(minilm, data_dir, sms_docs,
                                                                               tmp_path):
    docs = (sms_docs * 3)[:600]
    docs = [(f"doc-{i:04d}", f"{t} (#{i})") for i, (_, t) in enumerate(docs)]  # 600 distinct documents
    store = write_jsonl(tmp_path / "tickets.jsonl", docs)
    out = tmp_path / "scores.parquet"
    cmd = [sys.executable, "-m", "headfleet.service.cli", "score", "--source", str(store), "--tenant", TENANT,
           "-c", "spam", "--out", str(out), "--data-dir", str(data_dir), "--chunk-rows", "40"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HEADFLEET_DEVICE": "cpu"}
    checkpoint = tmp_path / "scores.parquet.partial" / "checkpoint.json"

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        committed = 0
        while committed < 3:  # three chunks committed, twelve to go
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no chunk was committed in 300 s"
            try:
                committed = json.loads(checkpoint.read_text())["cursor"][1]
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and checkpoint.exists()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming after" in done.stderr
    assert "doc/s" in done.stderr and "hit rate" in done.stderr  # the progress bar
    assert "documents: 600" in done.stdout and "spam (spam@1)" in done.stdout

    rows = rows_by_id(out)  # fails on a document written twice
    assert list(rows) == [d for d, _ in docs]
    report = json.loads((tmp_path / "scores.report.json").read_text())
    assert report["runs"] == 2 and report["resumed_at"] >= 120 and report["scored"] == 600
    # committed work was not redone: this run read and embedded only what the killed one had not committed
    assert report["this_run"] == {"documents": 600 - report["resumed_at"],
                                  "embeddings_computed": 600 - report["resumed_at"]}
    assert not checkpoint.parent.exists()

    with Engine.open(Settings(data_dir=data_dir, device="cpu", faiss_store=False), minilm) as engine:
        sample = docs[::37]
        want = engine.classify(TENANT, [t for _, t in sample], ["spam"])["results"]
    for (doc_id, _), res in zip(sample, want):
        assert rows[doc_id]["spam"]["label"] == res["classifications"]["spam"]["label"]

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stderr
