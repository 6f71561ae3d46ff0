"""Loading training data files and refusing or warning on bad data before any fitting."""

from __future__ import annotations

import json

import pytest

from headfleet.errors import TrainingDataError
from headfleet.heads import TokenStats, examples_from_records, load_examples, validate


def _pairs(counts: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"{label} example number {i}", label) for label, n in counts.items() for i in range(n)]


# --- loading --------------------------------------------------------------------------------
def test_csv_and_jsonl_give_the_same_examples(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\n"Hello, world",greet\nbye now,leave\n', encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(
        '{"text": "Hello, world", "label": "greet"}\n\n{"text": "bye now", "label": "leave"}\n', encoding="utf-8"
    )
    a, b = load_examples(tmp_path / "d.csv"), load_examples(tmp_path / "d.jsonl")
    assert a.texts == ["Hello, world", "bye now"] and a.labels == ["greet", "leave"]
    assert (a.texts, a.labels, a.source_hash) == (b.texts, b.labels, b.source_hash)
    assert len(a.source_hash) == 64
    assert examples_from_records([("Hello, world", "greet"), ("bye now", "leave")]).source_hash == a.source_hash


def test_custom_columns_bom_and_multiline_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('\ufeffid,body,cat\n1,"two\nlines",x\n2,one,y\n', encoding="utf-8")
    ex = load_examples(path, text_col="body", label_col="cat")
    assert ex.texts == ["two\nlines", "one"] and ex.labels == ["x", "y"]


def test_multi_label_csv_and_jsonl(tmp_path):
    (tmp_path / "m.csv").write_text("text,label\nfirst,b|a\nsecond,\nthird,c\n", encoding="utf-8")
    (tmp_path / "m.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [
            {"text": "first", "label": ["a", "b"]},
            {"text": "second", "label": []},
            {"text": "third", "label": "c"},
        ]),
        encoding="utf-8",
    )
    a = load_examples(tmp_path / "m.csv", multi_label=True)
    b = load_examples(tmp_path / "m.jsonl", multi_label=True)
    assert a.labels == b.labels == [["a", "b"], [], ["c"]]
    assert a.multi_label and a.source_hash == b.source_hash
    assert a.classes() == ["a", "b", "c"]


def test_missing_column_lists_the_columns_present(tmp_path):
    (tmp_path / "d.csv").write_text("sentence,category\nhi,a\n", encoding="utf-8")
    with pytest.raises(TrainingDataError) as e:
        load_examples(tmp_path / "d.csv")
    assert "'text'" in e.value.message and "['sentence', 'category']" in e.value.message
    (tmp_path / "d.jsonl").write_text('{"text": "hi", "label": "a"}\n{"text": "yo", "lbl": "b"}\n', encoding="utf-8")
    with pytest.raises(TrainingDataError, match=r"row 2.*'label'.*\['lbl', 'text'\]"):
        load_examples(tmp_path / "d.jsonl")


def test_unreadable_files_are_training_data_errors(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(TrainingDataError, match="UTF-8"):
        load_examples(tmp_path / "latin1.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{not json\n', encoding="utf-8")
    with pytest.raises(TrainingDataError, match="line 2"):
        load_examples(tmp_path / "bad.jsonl")
    (tmp_path / "d.txt").write_text("x", encoding="utf-8")
    with pytest.raises(TrainingDataError, match="unsupported"):
        load_examples(tmp_path / "d.txt")
    with pytest.raises(TrainingDataError, match="no such file"):
        load_examples(tmp_path / "absent.csv")
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    with pytest.raises(TrainingDataError, match="empty"):
        load_examples(tmp_path / "empty.csv")


# --- refusals -------------------------------------------------------------------------------
def test_empty_text_is_refused_naming_the_row():
    pairs = _pairs({"a": 5, "b": 5})
    pairs[3] = ("   ", "a")
    with pytest.raises(TrainingDataError, match=r"row\(s\) 4\b") as e:
        validate(examples_from_records(pairs))
    assert "whitespace" in e.value.message


def test_one_class_is_refused():
    with pytest.raises(TrainingDataError, match="only one class \\('a'\\)"):
        validate(examples_from_records(_pairs({"a": 10})))


def test_class_with_one_example_is_refused():
    pairs = _pairs({"a": 10, "b": 10, "rare": 1})
    with pytest.raises(TrainingDataError, match=r"'rare' \(row 21\).*at least 2"):
        validate(examples_from_records(pairs))


def test_no_examples_is_refused(tmp_path):
    with pytest.raises(TrainingDataError, match="no examples"):
        validate(examples_from_records([]))
    (tmp_path / "header_only.csv").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(TrainingDataError, match="no examples"):
        validate(load_examples(tmp_path / "header_only.csv"))


def test_empty_label_is_refused():
    pairs = _pairs({"a": 4, "b": 4}) + [("unlabelled text", "")]
    with pytest.raises(TrainingDataError, match=r"empty label in row\(s\) 9"):
        validate(examples_from_records(pairs))


def test_multi_label_rare_label_is_refused():
    records = [{"text": f"t{i}", "label": ["x", "y"] if i % 2 else ["x"]} for i in range(10)]
    records.append({"text": "z once", "label": ["z"]})
    with pytest.raises(TrainingDataError, match="'z'"):
        validate(examples_from_records(records, multi_label=True))


# --- warnings -------------------------------------------------------------------------------
def test_clean_data_has_no_warnings():
    report = validate(examples_from_records(_pairs({"a": 10, "b": 12})))
    assert report.warnings == [] and report.per_class == {"a": 10, "b": 12}
    assert report.to_dict()["n_examples"] == 22


def test_risky_data_warns():
    pairs = _pairs({"big": 60, "small": 3})
    pairs += [pairs[0], pairs[1]]  # two duplicates
    pairs += [(pairs[2][0], "small")]  # a text seen as 'big' now labelled 'small'
    report = validate(examples_from_records(pairs), TokenStats(unk_share=0.2, truncated_share=0.5))
    text = "\n".join(report.warnings)
    assert report.duplicates == 2 and report.conflicting == 1
    assert "few examples" in text and "'small': 4" in text
    assert "imbalance 15.5:1" in text
    assert "duplicate" in text and "different labels" in text
    assert "unknown" in text and "truncated" in text
    assert report.unk_share == 0.2


def test_token_stats_under_thresholds_do_not_warn():
    report = validate(examples_from_records(_pairs({"a": 10, "b": 10})), TokenStats(0.01, 0.05))
    assert report.warnings == []


@pytest.mark.parametrize("name, content", [("sms.csv", "body,label\nhello there,ham\n"),
                                           ("sms.jsonl", '{"body": "hello there", "label": "ham"}\n')])
def test_a_missing_column_says_how_each_entry_point_names_it(tmp_path, name, content):
    """The CLI user reads --text-col, the HTTP user text_col (the hint once named only the HTTP field)."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TrainingDataError) as e:
        load_examples(path)
    message = str(e.value)
    assert "'text'" in message and "body" in message
    assert "--text-col" in message and "text_col" in message
