"""The CLI as a user types it: train, classify (table and JSON), classifiers list/show/alias/delete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from headfleet.service import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "engine" / "example_data"


@pytest.fixture
def run(tmp_path, minilm, monkeypatch, capsys):
    """Run ``headfleet ARGS`` in process, sharing the loaded backbone; returns (code, stdout, stderr)."""
    import headfleet.engine.engine as engine_mod

    real_open = engine_mod.Engine.open.__func__
    monkeypatch.setattr(engine_mod.Engine, "open",
                        classmethod(lambda cls, settings=None, embedder=None: real_open(cls, settings, embedder or minilm)))

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
    timing = body["timing_ms"]  # the phases POST /classify reports, queue (none here) and total included
    assert {"queue", "embed", "heads", "total"} <= set(timing) and timing["queue"] == 0.0
    assert timing["total"] >= timing["embed"] + timing["heads"] > 0
    code, table, _ = run("classify", "--tenant", "acme", "-c", "spam", "Claim your free prize now")
    # a new CLI process: the vector comes back from the local store the last call persisted
    assert "spam" in table.splitlines()[0] and "local" in table and "local 1" in table and "computed 0" in table


def test_demo_says_whether_its_first_call_found_the_cache_cold(run):
    code, out, _ = run("demo")
    assert code == 0 and "# first call (cold cache)" in out and "# same call again (cached)" in out
    code, again, _ = run("demo")  # a second run on the same folder: the local store holds the texts
    assert code == 0 and "cold cache" not in again and "already holds these texts" in again


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


def test_classifiers_list_marks_a_lora_classifier(run, minilm, random_lora, tmp_path):
    """A LoRA classifier's head is a logreg; the table and the JSON must still say it reads an adapter."""
    from headfleet.engine import Engine
    from headfleet.settings import Settings

    run("train", "--tenant", "acme", "--name", "spam", "--data", str(EXAMPLES / "spam.csv"))
    with Engine.open(Settings(data_dir=tmp_path / "data", device="cpu"), embedder=minilm) as engine:
        random_lora(engine, "acme", "spam-lora")
    code, out, _ = run("classifiers", "list", "--tenant", "acme")
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert code == 0 and "LoRA" not in lines["spam"]
    assert "logreg" in lines["spam-lora"] and "+ LoRA r4 (query, value)" in lines["spam-lora"]
    code, out, _ = run("classifiers", "list", "--tenant", "acme", "--json")
    listed = {c["name"]: c for c in json.loads(out)}
    assert listed["spam"]["adapter"] is None and listed["spam-lora"]["type"] == "logreg"
    assert listed["spam-lora"]["adapter"] == {"format": "peft-lora", "source": "imported", "rank": 4, "alpha": 8.0,
                                              "targets": ["query", "value"]}


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


def test_retrain_after_a_backbone_switch(run, tmp_path, tiny_model_dir):
    from headfleet.embedder import Embedder
    from headfleet.heads import load_examples
    from headfleet.engine import Engine
    from headfleet.settings import Settings

    # heads trained on another backbone (a tiny BERT here), one of them saved before training data was kept
    settings = Settings(data_dir=tmp_path / "data", device="cpu")
    with Engine.open(settings, embedder=Embedder.load(tiny_model_dir, max_length=64)) as old:
        m = old.train("acme", "spam", load_examples(EXAMPLES / "spam.csv"))
        old.train("globex", "urgency", load_examples(EXAMPLES / "urgency.csv"), kind="mlp", seed=5)
        _, head = old.registry.load("acme", "spam")
        old.registry.save("acme", "legacy", head, {"parent_fingerprint": m["parent_fingerprint"]})

    code, out, _ = run("classifiers", "list", "--tenant", "acme")
    assert code == 0 and all("NEEDS RETRAIN (latest" in line for line in out.splitlines())
    code, out, _ = run("retrain", "--tenant", "acme", "--list")
    assert code == 0 and "2 classifier version(s) trained on another backbone" in out
    assert "acme/legacy@1" in out and "NO stored training data" in out and "acme/spam@1" in out
    code, out, _ = run("retrain", "--tenant", "acme", "spam", "--dry-run")
    assert code == 0 and "would retrain from 32 stored examples" in out and "legacy" not in out
    code, out, _ = run("classifiers", "show", "--tenant", "acme", "spam")
    assert json.loads(out)["version"] == 1  # the dry run saved nothing

    code, out, _ = run("retrain", "--tenant", "acme")
    assert code == 1  # one classifier could not be retrained, and the output says which and why
    assert "retrained as spam@2 from 32 stored examples (logreg, seed 0)" in out
    assert "acme/legacy@1" in out and "no stored training data" in out
    code, out, _ = run("classify", "--tenant", "acme", "-c", "spam", "Claim your free prize now", "--json")
    assert code == 0 and json.loads(out)["results"][0]["classifications"]["spam"]["label"] == "spam"

    code, out, _ = run("retrain", "--all-tenants", "urgency", "--json")
    body = json.loads(out)
    assert code == 0 and [(r["tenant"], r["status"], r["new_id"], r["kind"], r["seed"]) for r in body["results"]] == [
        ("globex", "retrained", "urgency@2", "mlp", 5)]
    code, out, _ = run("classify", "--tenant", "globex", "-c", "urgency", "The database is down for every customer")
    assert code == 0 and "urgent" in out


def test_an_operator_switches_to_onnx_and_retrains_with_the_installed_command(minilm, onnx_cache, tmp_path):
    """The path the README gives after a backend switch, with nothing replaced: heads trained on
    torch fp32, then ``HEADFLEET_BACKEND=onnx HEADFLEET_PRECISION=int8 headfleet retrain --all-tenants``
    and ``headfleet classify`` in their own processes, as an operator types them."""
    import os
    import shutil

    from headfleet.embedder import Embedder
    from headfleet.heads import load_examples
    from headfleet.engine import Engine
    from headfleet.settings import Settings

    data = tmp_path / "data"
    with Engine.open(Settings(data_dir=data, device="cpu"), embedder=minilm) as old:  # the default backend
        old.train("acme", "spam", load_examples(EXAMPLES / "spam.csv"))
        old.train("globex", "urgency", load_examples(EXAMPLES / "urgency.csv"), kind="mlp", seed=5)
    # the session's int8 export, put where the service keeps exports, so the commands do not export again
    int8 = Embedder.load(max_length=256, device="cpu", backend="onnx", precision="int8", cache_dir=onnx_cache)
    shutil.copytree(onnx_cache, data / "onnx", dirs_exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HEADFLEET_DATA_DIR": str(data),
           "HEADFLEET_BACKEND": "onnx", "HEADFLEET_PRECISION": "int8"}
    exe = str(Path(sys.executable).parent / "headfleet")

    def headfleet(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=600)

    listed = headfleet("classifiers", "list", "--tenant", "acme")
    assert listed.returncode == 0 and "NEEDS RETRAIN" in listed.stdout, listed.stdout + listed.stderr
    done = headfleet("retrain", "--all-tenants", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    body = json.loads(done.stdout)
    assert sorted((r["tenant"], r["status"], r["new_id"]) for r in body["results"]) == [
        ("acme", "retrained", "spam@2"), ("globex", "retrained", "urgency@2")]
    out = headfleet("classify", "--tenant", "acme", "-c", "spam", "Claim your free prize now", "See you at lunch",
                    "--json")
    assert out.returncode == 0, out.stderr
    answers = [r["classifications"]["spam"] for r in json.loads(out.stdout)["results"]]
    assert [(a["label"], a["version"]) for a in answers] == [("spam", 2), ("ham", 2)]
    shown = headfleet("classifiers", "show", "--tenant", "globex", "urgency")
    manifest = json.loads(shown.stdout)
    assert manifest["parent_fingerprint"] == int8.fingerprint and manifest["type"] == "mlp"
    assert manifest["retrained_from"]["parent_fingerprint"] == minilm.fingerprint
    again = headfleet("classifiers", "list", "--tenant", "acme")
    assert again.returncode == 0 and "NEEDS RETRAIN" not in again.stdout, again.stdout


def test_a_second_serve_on_a_busy_port_fails_before_loading_anything(tmp_path):
    import os
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HEADFLEET_DATA_DIR": str(tmp_path / "data")}
        out = subprocess.run([sys.executable, "-m", "headfleet.service.cli", "serve", "--port", str(port),
                              "--no-examples"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"error (conflict): port {port} on 127.0.0.1 is already in use" in out.stderr
    assert "listening on" not in out.stderr  # it never claims to listen
    assert not (tmp_path / "data").exists()  # nothing loaded or opened: no local store, no registry sweep
