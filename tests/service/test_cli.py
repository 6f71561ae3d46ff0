"""The CLI as a user types it: train, classify (table and JSON), classifiers list/show/alias/delete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from headfleet.service import cli

EXAMPLES = Path(cli.__file__).parent / "example_data"


@pytest.fixture
def run(tmp_path, minilm, monkeypatch, capsys):
    """Run ``headfleet ARGS`` in process, sharing the loaded backbone; returns (code, stdout, stderr)."""
    from headfleet.service import engine as engine_mod

    real_open = engine_mod.Engine.open.__func__
    monkeypatch.setattr(engine_mod.Engine, "open",
                        classmethod(lambda cls, settings=None, embedder=None: real_open(cls, settings, minilm)))

    def _run(*args):
        code = cli.main([*args, "--data-dir", str(tmp_path / "data")])
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def test_train_then_classify_with_two_classifiers(run):
    code, out, _ = run("train", "--tenant", "acme", "--name", "spam", "--data", str(EXAMPLES / "spam.csv"))
    assert code == 0 and "holdout" in out and "saved acme/spam@1" in out and "per class: ham=" in out
    run("train", "--tenant", "acme", "--name", "urgency", "--data", str(EXAMPLES / "urgency.csv"), "--type", "mlp")
    code, out, _ = run("classify", "--tenant", "acme", "-c", "spam", "-c", "urgency",
                       "Claim your free prize now", "The database is down for every customer", "--json")
    assert code == 0
    body = json.loads(out)
    assert body["results"][0]["classifications"]["spam"]["label"] == "spam"
    assert body["results"][1]["classifications"]["urgency"]["label"] == "urgent"
    code, table, _ = run("classify", "--tenant", "acme", "-c", "spam", "Claim your free prize now")
    # a new CLI process: the vector comes back from the local store the last call persisted
    assert "spam" in table.splitlines()[0] and "local" in table and "local 1" in table and "computed 0" in table


def test_classifiers_list_show_alias_delete(run):
    for _ in range(2):
        run("train", "--tenant", "acme", "--name", "spam", "--data", str(EXAMPLES / "spam.csv"))
    code, out, _ = run("classifiers", "list", "--tenant", "acme")
    assert code == 0 and out.startswith("spam") and "v2" in out
    code, out, _ = run("classifiers", "alias", "--tenant", "acme", "spam", "prod", "1")
    assert code == 0
    code, out, _ = run("classifiers", "show", "--tenant", "acme", "spam@prod")
    assert json.loads(out)["version"] == 1
    code, out, _ = run("classifiers", "list", "--tenant", "someone-else")
    assert "has no classifiers" in out
    code, _, _ = run("classifiers", "delete", "--tenant", "acme", "spam")
    assert code == 0
    code, _, err = run("classifiers", "show", "--tenant", "acme", "spam")
    assert code == 2 and "error (not_found)" in err


def test_bad_training_data_exits_2_with_the_reason(run, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,a\n,b\nthird,b\nfourth,a\n")
    code, _, err = run("train", "--tenant", "acme", "--name", "x", "--data", str(bad))
    assert code == 2 and "error (training_data_error)" in err and "empty" in err
    code, _, err = run("train", "--tenant", "acme", "--name", "x", "--data", str(bad), "--label-col", "category")
    assert code == 2 and "label" in err


def test_the_installed_entry_point_answers_help():
    exe = Path(sys.executable).parent / "headfleet"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("train", "classify", "classifiers", "demo"):
        assert command in out.stdout
