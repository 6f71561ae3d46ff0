"""``reproduce``: a published version refit from its stored data, with nothing published, says whether it
comes out the same and, when it does not, what differs (data, library versions, backbone, seed).

Changed libraries and changed data are simulated on copies of a version inside the test's own data
folder (a copied version folder with its manifest or stored data edited), never on the library itself.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest

from headfleet.embedder.lora_train import LoraTrainConfig
from headfleet.engine import Engine
from headfleet.heads import Examples, load_examples
from headfleet.heads.examples import TRAINING_DATA_FILE, examples_to_bytes
from headfleet.lifecycle.feedback import FeedbackBook, Labelled
from headfleet.lifecycle.reproduce import METRICS_ATOL, reproduce
from headfleet.lifecycle.retrain import make_review
from headfleet.lifecycle.store import open_store
from headfleet.settings import Settings

SPAM = Path(__file__).resolve().parents[2] / "engine" / "example_data" / "spam.csv"
T = "acme"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reproduce") / "data"


@pytest.fixture(scope="module")
def engine(minilm, data):
    eng = Engine.open(Settings(data_dir=data, device="cpu", faiss_store=False), embedder=minilm)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def spam(engine) -> dict:
    return engine.train(T, "spam", load_examples(SPAM), kind="logreg", seed=3)


def copy_version(engine: Engine, manifest: dict, edit=None) -> str:
    """A copy of ``manifest``'s version as the classifier's next version (its manifest renumbered and
    passed through ``edit``); returns its ref."""
    versions = engine.registry.version_dir(T, manifest).parent
    new = max(int(p.name) for p in versions.iterdir() if p.name.isdigit()) + 1
    shutil.copytree(versions / str(manifest["version"]), versions / str(new))
    path = versions / str(new) / "manifest.json"
    copied = json.loads(path.read_text())
    copied.update(version=new, id=f"{manifest['name']}@{new}")
    if edit is not None:
        edit(copied, versions / str(new))
    path.write_text(json.dumps(copied))
    return copied["id"]


def one_label_flipped() -> Examples:
    """The stored data with its first example's label flipped: a training file changed after publishing."""
    ex = load_examples(SPAM)
    labels = list(ex.labels)
    labels[0] = "ham" if labels[0] == "spam" else "spam"
    return Examples(list(ex.texts), labels, ex.multi_label)


def test_a_head_version_reproduces_bit_exactly_and_nothing_is_published(engine, spam):
    assert spam["environment"]["numerics"]["torch"] == importlib.metadata.version("torch")
    assert len(spam["environment"]["lock"]) == 64 and spam["environment"]["distributions"] > 10
    versions = engine.registry.versions(T, "spam")

    out = reproduce(engine, T, "spam@1")

    assert out["match"] is True and out["comparison"] == "exact" and out["tolerance"] is None
    assert out["weights_sha256"] == {"recorded": spam["weights"]["sha256"], "now": spam["weights"]["sha256"]}
    assert out["weights_max_abs_diff"] == 0.0
    assert out["metrics"]["now"] == out["metrics"]["recorded"] == {
        "accuracy": spam["metrics"]["accuracy"], "macro_f1": spam["metrics"]["macro_f1"]}
    assert out["embeddings"] == {"cached": 32, "computed": 0}
    assert out["differences"] == []
    assert out["unknown"] == ["canary_hash"]  # trained outside the service: nobody said which canary it had
    assert engine.registry.versions(T, "spam") == versions  # a reproduction publishes nothing


def test_another_seed_is_named_and_changes_the_weights(engine, spam):
    out = reproduce(engine, T, "spam@1", seed=4)
    assert {"what": "seed", "recorded": 3, "now": 4} in out["differences"]


def test_a_changed_library_version_is_named(engine, spam):
    def older_numpy(manifest, _folder):
        manifest["environment"]["numerics"]["numpy"] = "1.21.0"
        manifest["library_versions"]["numpy"] = "1.21.0"

    ref = copy_version(engine, spam, older_numpy)
    out = reproduce(engine, T, ref)

    now = importlib.metadata.version("numpy")
    assert out["differences"] == [{"what": "library", "name": "numpy", "recorded": "1.21.0", "now": now}]
    assert out["match"] is True  # the weights still come out the same here: the difference is only named


def test_a_changed_training_file_is_named_as_a_data_difference(engine, spam):
    changed = one_label_flipped()

    def other_data(_manifest, folder):
        (folder / TRAINING_DATA_FILE).write_bytes(examples_to_bytes(changed))

    out = reproduce(engine, T, copy_version(engine, spam, other_data))

    assert out["match"] is False and out["weights_sha256"]["now"] != out["weights_sha256"]["recorded"]
    assert out["differences"] == [{"what": "data", "recorded": spam["training_data_hash"],
                                   "now": changed.source_hash}]


def test_a_version_saved_before_the_new_fields_reports_them_unknown_not_different(engine, spam):
    def old(manifest, _folder):
        del manifest["environment"]

    out = reproduce(engine, T, copy_version(engine, spam, old))

    assert out["match"] is True and out["differences"] == []
    assert set(out["unknown"]) == {"environment", "canary_hash"}


def test_a_monitor_candidate_records_its_canary_and_reproduce_reports_it(engine, spam, data):
    book = FeedbackBook(open_store(Settings(data_dir=data)))
    ex = load_examples(SPAM)
    canary = Labelled(ex.texts[:10], ex.labels[:10])
    stored = book.set_canary(T, "spam", canary, multi_label=False)
    review = make_review(engine, T, spam, book.canary(T, "spam", rolling=0), None, {"reason": "test"}, 0.05,
                         engine.embed)
    candidate = engine.train(T, "spam", ex, kind="logreg", seed=3, candidate=True, review=review)
    assert candidate["canary_hash"] == stored["hash"]

    out = reproduce(engine, T, candidate["id"])
    assert out["canary_hash"] == stored["hash"] and "canary_hash" not in out["unknown"]
    assert out["match"] is True


def test_a_lora_version_reproduces_within_the_stated_tolerance(engine):
    manifest = engine.train_lora(T, "spam-lora", load_examples(SPAM), config=LoraTrainConfig(epochs=1, rank=2, alpha=4))

    out = reproduce(engine, T, manifest["id"])

    assert out["kind"] == "lora" and out["comparison"] == "tolerance"
    assert out["tolerance"] == {"weights_max_abs": None, "metrics_abs": METRICS_ATOL} and "LoRA" in out["why"]
    assert out["match"] is True and out["differences"] == []
    recorded, now = out["metrics"]["recorded"], out["metrics"]["now"]
    assert recorded and all(abs(recorded[k] - now[k]) <= METRICS_ATOL for k in recorded)
    # its dropout is seeded now, so on this CPU the refit is the same adapter, byte for byte
    assert out["adapter_sha256"]["now"] == out["adapter_sha256"]["recorded"] == manifest["adapter"]["sha256"]


def test_the_cli_exits_0_when_a_version_matches_and_1_when_it_does_not(engine, spam, data, capsys, monkeypatch):
    from headfleet.service.cli_reproduce import add_parser

    for var in ("HEADFLEET_BACKEND", "HEADFLEET_PRECISION", "HEADFLEET_MODEL", "HEADFLEET_MAX_LENGTH"):
        monkeypatch.delenv(var, raising=False)
    parser = argparse.ArgumentParser(prog="headfleet")
    common = argparse.ArgumentParser(add_help=False)
    for flag in ("--data-dir", "--redis-url"):
        common.add_argument(flag)
    common.add_argument("--max-length", type=int)
    common.add_argument("--threads", type=int)
    common.add_argument("--tenant", default="default")
    common.add_argument("--json", action="store_true")
    add_parser(parser.add_subparsers(dest="command", required=True), common)

    def run(*argv: str) -> int:
        args = parser.parse_args(["reproduce", *argv, "--tenant", T, "--data-dir", str(data)])
        return args.func(args)

    assert run("spam@1", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["match"] is True and out["weights_sha256"]["now"] == spam["weights"]["sha256"]

    def other_data(_manifest, folder):
        (folder / TRAINING_DATA_FILE).write_bytes(examples_to_bytes(one_label_flipped()))

    assert run(copy_version(engine, spam, other_data)) == 1
    text = capsys.readouterr().out
    assert "does NOT reproduce" in text and "data:" in text
