"""The label rule: one canonical string per label, whatever the format spelled it as.

Every family is checked in every reader that can spell it (JSON records, CSV, JSONL), with the
exact labels that come out, the exact refusal (file, row) and the merge warning of ``validate``.
"""

from __future__ import annotations

import json

import pytest

from headfleet.errors import TrainingDataError
from headfleet.heads.data import canonical_label, examples_from_records, label_set, parse_examples, validate

# --- the rule, value by value -------------------------------------------------------------------
@pytest.mark.parametrize("value, label", [
    (True, "true"), (False, "false"),                        # JSON booleans
    ("True", "true"), ("TRUE", "true"), (" false ", "false"),  # their string spellings, any case
    (1, "1"), (1.0, "1"), ("1.0", "1"), (" 1 ", "1"), ("1e0", "1"), (-0.0, "0"), ("-0", "0"),
    (12345678901234567890, "12345678901234567890"), (1e20, "100000000000000000000"),
    (0.5, "0.5"), ("0.50", "0.5"), (1e-05, "0.00001"), ("-2.25", "-2.25"),
    ("01", "01"), ("+1", "+1"), ("1.", "1."), ("1e999", "1e999"),  # not JSON numbers: kept as written
    ("Spam", "Spam"), ("  spam\t", "spam"), ("a|b", "a|b"), ("[draft", "[draft"), ("yes", "yes"),
])
def test_canonical_label(value, label):
    assert canonical_label(value) == label


@pytest.mark.parametrize("value, message", [
    (None, "row 7: missing label"),
    ("", "row 7: missing label"),
    ("\u200b\ufeff", "row 7: missing label"),
    (float("nan"), "row 7: the label nan is not a finite number"),
    (float("inf"), "row 7: the label inf is not a finite number"),
    ({"name": "spam"}, "row 7: a label must be a string, number or boolean, got an object"),
    (["a", "b"], "row 7: got a list label ['a', 'b'] where one label is expected; for multi-label data set multi_label=true"),
    ("['a', 'b']", "row 7: the label \"['a', 'b']\" is a list of 2 label(s) where one label is expected; for multi-label data set multi_label=true"),
    ('["a","b"]', "row 7: the label '[\"a\",\"b\"]' is a list of 2 label(s)"),
    ("[draft]", "row 7: the label '[draft]' looks like a list but is not a valid one"),
    ("x\ud83d", "row 7: the label holds a lone surrogate U+D83D"),
])
def test_canonical_label_refusals(value, message):
    with pytest.raises(TrainingDataError) as e:
        canonical_label(value, "row 7")
    assert e.value.message.startswith(message)


@pytest.mark.parametrize("value, labels", [
    (["urgent", "billing"], ["billing", "urgent"]),
    ("['billing', 'urgent']", ["billing", "urgent"]),   # Python list literal (pandas to_csv)
    ('["billing","urgent"]', ["billing", "urgent"]),    # JSON array in a string cell
    ("urgent|billing", ["billing", "urgent"]),          # the documented a|b
    ("[1, 'x', True]", ["1", "true", "x"]),             # elements by the label rule
    (["1", 1.0, " 1 ", True, "TRUE"], ["1", "true"]),
    ("['a', '', ' ']", ["a"]), ("a||b|", ["a", "b"]),  # empty elements dropped
    ("[]", []), ("", []), (None, []), ("\u200b", []), (3, ["3"]),
])
def test_label_sets(value, labels):
    assert label_set(value) == labels


@pytest.mark.parametrize("value, message", [
    ("[[1]]", "row 2: a label list holds strings and numbers only, got [1] in '[[1]]'"),
    ("[None]", "row 2: a label list holds strings and numbers only, got None in '[None]'"),
    (["a", None], "row 2: a label list holds strings and numbers only, got None in ['a', None]"),
    ("[__import__('os')]", "row 2: the label \"[__import__('os')]\" looks like a list but is not a valid one"),
    ({"a": 1}, "row 2: a multi-label cell must be a list, a list literal or 'a|b', got dict"),
    (["ok", "\udc80"], "row 2: the label holds a lone surrogate U+DC80"),
])
def test_label_set_refusals(value, message):
    with pytest.raises(TrainingDataError) as e:
        label_set(value, "row 2")
    assert e.value.message.startswith(message)


# --- the same rule in every reader ----------------------------------------------------------------
def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_json_booleans_are_true_and_false():
    ex = examples_from_records([{"text": f"t{i}", "label": i % 2 == 0} for i in range(4)])
    assert ex.labels == ["true", "false", "true", "false"] and ex.classes() == ["false", "true"]
    assert ex.label_spellings == {}  # one spelling each: nothing merged, nothing to warn about
    jsonl = parse_examples("d.jsonl", _jsonl([{"text": "a", "label": True}, {"text": "b", "label": False}]))
    assert jsonl.labels == ["true", "false"]


def test_csv_true_in_any_case_is_the_same_label_as_json_true():
    csv = parse_examples("d.csv", b"text,label\na,True\nb,TRUE\nc,false\nd,False\n")
    assert csv.labels == ["true", "true", "false", "false"]
    assert csv.label_spellings == {"false": ["False", "false"], "true": ["TRUE", "True"]}
    records = examples_from_records([("a", True), ("b", True), ("c", False), ("d", False)])
    assert records.labels == csv.labels and records.source_hash == csv.source_hash


def _report_warnings(examples) -> list[str]:
    return [w for w in validate(examples).warnings if "were read as one label" in w]


def test_one_and_one_point_zero_collapse_with_a_warning_in_every_format():
    spelled = [1, 1.0, "1.0", 2, 2, 2]
    records = examples_from_records([{"text": f"t{i}", "label": v} for i, v in enumerate(spelled)])
    jsonl = parse_examples("d.jsonl", _jsonl([{"text": f"t{i}", "label": v} for i, v in enumerate(spelled)]))
    csv = parse_examples("d.csv", ("text,label\n" + "".join(f"t{i},{v}\n" for i, v in enumerate(spelled))).encode())
    for ex in (records, jsonl, csv):
        assert ex.labels == ["1", "1", "1", "2", "2", "2"]
        assert ex.label_spellings == {"1": ["1", "1.0"]}
        assert _report_warnings(ex) == [
            'labels "1" and "1.0" were read as one label "1" (numbers are read by value, true/false in any case '
            "as lower case); if they are different classes, rename one"
        ]
    assert records.source_hash == jsonl.source_hash == csv.source_hash


def test_whitespace_alone_is_not_a_merge_worth_a_warning():
    csv = parse_examples("d.csv", b"text,label\na, 1 \nb,1\nc,x\nd,x \n")
    assert csv.labels == ["1", "1", "x", "x"] and csv.label_spellings == {}
    assert _report_warnings(csv) == []


def test_three_spellings_are_all_named():
    ex = examples_from_records([("a", 1), ("b", "1.0"), ("c", "1e0"), ("d", 2), ("e", 2)])
    assert ex.labels == ["1", "1", "1", "2", "2"]
    assert _report_warnings(ex)[0].startswith('labels "1", "1.0" and "1e0" were read as one label "1"')


def test_merged_multi_label_spellings_warn_too():
    ex = examples_from_records([{"text": "a", "label": ["1", 1.0]}, {"text": "b", "label": "1|x"},
                                {"text": "c", "label": ["x"]}], multi_label=True)
    assert ex.labels == [["1"], ["1", "x"], ["x"]]
    assert ex.label_spellings == {"1": ["1", "1.0"]}


def test_missing_and_nested_labels_are_refused_naming_the_row():
    with pytest.raises(TrainingDataError, match=r"empty label in row\(s\) 2, 3 \(missing, null or no visible content\)"):
        validate(examples_from_records([("a", "x"), ("b", None), ("c", "\u200b"), ("d", "x"), ("e", "y"), ("f", "y")]))
    with pytest.raises(TrainingDataError) as e:
        examples_from_records([("a", "x"), ("b", {"name": "x"})])
    assert e.value.message.startswith("record 2: a label must be a string, number or boolean, got an object")
    with pytest.raises(TrainingDataError) as e:
        parse_examples("d.jsonl", _jsonl([{"text": "a", "label": "x"}, {"text": "b", "label": {"k": 1}}]))
    assert e.value.message.startswith("d.jsonl row 2 (line 2): a label must be a string, number or boolean")
    with pytest.raises(TrainingDataError, match=r"d.jsonl row 1 \(line 1\): the label nan is not a finite number"):
        parse_examples("d.jsonl", b'{"text": "a", "label": NaN}\n')


# --- list-shaped labels ---------------------------------------------------------------------------
LIST_CSV = b"""text,label
"I was charged twice","['billing', 'urgent']"
"refund please","[""billing""]"
"site is down","urgent|outage"
"""


def test_list_literals_in_a_multi_label_csv():
    ex = parse_examples("tickets.csv", LIST_CSV, multi_label=True)
    assert ex.labels == [["billing", "urgent"], ["billing"], ["outage", "urgent"]]
    assert ex.classes() == ["billing", "outage", "urgent"]


def test_list_literals_in_multi_label_jsonl_and_records():
    rows = [{"text": "I was charged twice", "label": ["billing", "urgent"]},
            {"text": "refund please", "label": "['billing']"},
            {"text": "site is down", "label": '["urgent", "outage"]'}]
    jsonl = parse_examples("tickets.jsonl", _jsonl(rows), multi_label=True)
    records = examples_from_records(rows, multi_label=True)
    csv = parse_examples("tickets.csv", LIST_CSV, multi_label=True)
    assert jsonl.labels == records.labels == csv.labels == [["billing", "urgent"], ["billing"], ["outage", "urgent"]]
    assert jsonl.source_hash == records.source_hash == csv.source_hash


def test_a_list_label_in_single_label_data_is_refused_naming_the_row():
    with pytest.raises(TrainingDataError) as e:
        parse_examples("tickets.csv", LIST_CSV)
    assert e.value.message.startswith(
        "tickets.csv row 1 (line 2): the label \"['billing', 'urgent']\" is a list of 2 label(s) where one label "
        "is expected; for multi-label data set multi_label=true")
    rows = [{"text": "ok", "label": "billing"}, {"text": "charged twice", "label": ["billing", "urgent"]}]
    with pytest.raises(TrainingDataError) as e:
        parse_examples("tickets.jsonl", _jsonl(rows))
    assert e.value.message.startswith("tickets.jsonl row 2 (line 2): got a list label ['billing', 'urgent'] where "
                                      "one label is expected; for multi-label data set multi_label=true")
    with pytest.raises(TrainingDataError) as e:
        examples_from_records(rows)
    assert e.value.message.startswith("record 2: got a list label ['billing', 'urgent']")
    with pytest.raises(TrainingDataError) as e:
        examples_from_records([("ok", "billing"), ("charged twice", '["billing","urgent"]')])
    assert e.value.message.startswith("record 2: the label '[\"billing\",\"urgent\"]' is a list of 2 label(s)")


def test_oversized_numbers_are_refusals_not_crashes():
    assert canonical_label("9" * 5000) == "9" * 5000  # digits are kept as written, never converted
    with pytest.raises(TrainingDataError, match="^record 1: the integer label is too long"):
        examples_from_records([("a", 10**5000)])
    with pytest.raises(TrainingDataError, match=r"^d.jsonl row 1 \(line 1\): invalid JSON \(ValueError"):
        parse_examples("d.jsonl", b'{"text": "a", "label": ' + b"9" * 5000 + b"}\n")
    with pytest.raises(TrainingDataError, match=r"^d.jsonl row 1 \(line 1\): invalid JSON \(RecursionError"):
        parse_examples("d.jsonl", b'{"text": "a", "label": ' + b"[" * 100_000 + b"\n")
    with pytest.raises(TrainingDataError, match="looks like a list but is not a valid one"):
        label_set("[" * 5000 + "]" * 5000)
