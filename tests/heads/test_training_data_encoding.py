"""Bytes and characters in training data: BOMs, CRLF, invalid UTF-8, lone surrogates, invisible text.

Each refusal is a TrainingDataError (a 422 over HTTP, exit 2 from the CLI) naming the file and the
1-based row and line; nothing here may surface as a UnicodeDecodeError or UnicodeEncodeError.
Uploads (``parse_examples``) and CLI files (``load_examples``) share one path and are both checked.
"""

from __future__ import annotations

import gzip
import json

import pytest

from headfleet.errors import TrainingDataError
from headfleet.heads.data import (
    Examples,
    examples_from_bytes,
    examples_from_records,
    examples_to_bytes,
    load_examples,
    parse_examples,
    validate,
)

BOM = b"\xef\xbb\xbf"
EXPECTED = (["Hello, world", "two\nlines", "bye now"], ["greet", "multi", "leave"])


@pytest.fixture(params=["upload", "file"])
def read(request, tmp_path):
    """read(name, content, **kw): the upload path, or the CLI path through a file on disk."""
    def upload(name: str, content: bytes, **kw):
        return parse_examples(name, content, **kw)

    def from_file(name: str, content: bytes, **kw):
        (tmp_path / name).write_bytes(content)
        return load_examples(tmp_path / name, **kw)

    return upload if request.param == "upload" else from_file


# --- BOM and CRLF -----------------------------------------------------------------------------------
def test_bom_and_crlf_csv(read):
    content = BOM + b'text,label\r\n"Hello, world",greet\r\n"two\r\nlines",multi\r\nbye now,leave\r\n'
    ex = read("d.csv", content)
    assert (ex.texts, ex.labels) == EXPECTED
    lf = read("lf.csv", b'text,label\n"Hello, world",greet\n"two\nlines",multi\nbye now,leave\n')
    assert ex.source_hash == lf.source_hash  # line ends and BOM do not change the data


def test_bom_before_a_quoted_header_and_a_double_bom(read):
    ex = read("d.csv", BOM + BOM + b'"text","label"\r\nhi,a\r\n')
    assert (ex.texts, ex.labels) == (["hi"], ["a"])


def test_bom_and_crlf_jsonl(read):
    rows = [{"text": "Hello, world", "label": "greet"}, {"text": "two\nlines", "label": "multi"},
            {"text": "bye now", "label": "leave"}]
    content = BOM + b"\r\n".join(json.dumps(r).encode() for r in rows) + b"\r\n\r\n"
    ex = read("d.jsonl", content)
    assert (ex.texts, ex.labels) == EXPECTED


def test_old_mac_line_ends_and_a_bom_mid_jsonl(read):
    ex = read("d.jsonl", b'{"text": "a", "label": "x"}\r' + BOM + b'{"text": "b", "label": "y"}\r')
    assert (ex.texts, ex.labels) == (["a", "b"], ["x", "y"])


def test_utf16_files_are_refused_with_what_to_do(read):
    with pytest.raises(TrainingDataError, match=r"^d.csv: the file is UTF-16 .*re-save it as UTF-8"):
        read("d.csv", "text,label\nhi,a\n".encode("utf-16"))


# --- invalid UTF-8 bytes ------------------------------------------------------------------------------
def test_invalid_utf8_in_a_csv_names_the_row_and_line(read):
    content = 'text,label\nfine,a\n"multi\nline",b\ncaf\xe9,a\n'.encode("latin-1")
    with pytest.raises(TrainingDataError) as e:
        read("latin1.csv", content)
    assert e.value.message == "latin1.csv row 3 (line 5): not valid UTF-8 (byte 0xE9); re-save the file as UTF-8"


def test_invalid_utf8_in_a_csv_header(read):
    with pytest.raises(TrainingDataError, match=r"^h.csv header \(line 1\): not valid UTF-8 \(byte 0xFF\)"):
        read("h.csv", b"text,lab\xffel\nhi,a\n")


def test_invalid_utf8_in_jsonl_names_the_row_and_line(read):
    content = b'{"text": "a", "label": "x"}\n\n{"text": "caf\xc3", "label": "y"}\n'
    with pytest.raises(TrainingDataError) as e:
        read("d.jsonl", content)
    assert e.value.message == "d.jsonl row 2 (line 3): not valid UTF-8 (byte 0xC3); re-save the file as UTF-8"


def test_a_line_of_nothing_but_invalid_bytes_is_not_skipped_as_blank(read):
    with pytest.raises(TrainingDataError, match=r"^d.jsonl row 2 \(line 2\): not valid UTF-8 \(byte 0xA0\)"):
        read("d.jsonl", b'{"text": "a", "label": "x"}\n\xa0\xa0\n')
    with pytest.raises(TrainingDataError, match=r"^d.csv row 2 \(line 3\): not valid UTF-8 \(byte 0xA0\)"):
        read("d.csv", b"text,label\na,x\n\xa0,\n")


def test_utf8_encoded_surrogates_are_invalid_bytes(read):
    # CESU-8 / WTF-8 writes U+D83D as ED A0 BD: not UTF-8
    with pytest.raises(TrainingDataError, match=r"^d.csv row 1 \(line 2\): not valid UTF-8 \(byte 0xED\)"):
        read("d.csv", b"text,label\nrocket \xed\xa0\xbd,x\n")


# --- lone surrogates from JSON escapes ------------------------------------------------------------------
def test_lone_surrogate_escape_in_jsonl_text_or_label(read):
    content = b'{"text": "ok", "label": "x"}\n{"text": "rocket \\ud83d", "label": "y"}\n'
    with pytest.raises(TrainingDataError) as e:
        read("d.jsonl", content)
    assert e.value.message.startswith("d.jsonl row 2 (line 2): the text holds a lone surrogate U+D83D")
    content = b'{"text": "ok", "label": "x"}\n\n{"text": "fine", "label": "\\ude80"}\n'
    with pytest.raises(TrainingDataError) as e:
        read("d.jsonl", content)
    assert e.value.message.startswith("d.jsonl row 2 (line 3): the label holds a lone surrogate U+DE80")
    content = b'{"text": "fine", "label": ["a", "\\ud83d"]}\n'
    with pytest.raises(TrainingDataError, match=r"^d.jsonl row 1 \(line 1\): the label holds a lone surrogate"):
        read("d.jsonl", content, multi_label=True)


def test_a_whole_surrogate_pair_is_one_character():
    ex = parse_examples("d.jsonl", b'{"text": "rocket \\ud83d\\ude80", "label": "y"}\n')
    assert ex.texts == ["rocket \U0001f680"]


def test_lone_surrogate_in_json_records():
    records = json.loads('[{"text": "ok", "label": "a"}, {"text": "x \\ud83d", "label": "b"}]')
    with pytest.raises(TrainingDataError, match=r"^record 2: the text holds a lone surrogate U\+D83D"):
        examples_from_records(records)
    records = json.loads('[{"text": "ok", "label": "a"}, {"text": "fine", "label": "b\\ud83d"}]')
    with pytest.raises(TrainingDataError, match=r"^record 2: the label holds a lone surrogate U\+D83D"):
        examples_from_records(records)


def test_examples_built_directly_with_a_lone_surrogate_are_refused_naming_the_row():
    with pytest.raises(TrainingDataError, match=r"^training data row 2: the text holds a lone surrogate"):
        Examples(["ok", "bad \udc80"], ["a", "b"], multi_label=False)


def test_stored_training_data_with_a_lone_surrogate_is_refused_naming_the_row():
    good = gzip.decompress(examples_to_bytes(Examples(["one", "two"], ["a", "b"], multi_label=False))).decode()
    bad = gzip.compress(good.replace('"two"', '"tw\\ud83do"').encode())
    with pytest.raises(TrainingDataError) as e:
        examples_from_bytes(bad, where="acme/spam@1 training data")
    assert e.value.message.startswith("acme/spam@1 training data row 2 (line 3): the text holds a lone surrogate")


# --- texts with no visible content --------------------------------------------------------------------
INVISIBLE = "\u200b\u200c\u200d\ufeff"


@pytest.mark.parametrize("blank", [INVISIBLE, " \u200b ", "\u2060", "\u00ad", "\u3164", "\u2800", ""])
def test_invisible_only_text_is_refused_like_an_empty_one(blank):
    pairs = [(f"{label} example {i}", label) for label in "ab" for i in range(4)]
    pairs[2] = (blank, "a")
    with pytest.raises(TrainingDataError) as e:
        validate(examples_from_records(pairs))
    assert e.value.message.startswith("the text in row(s) 3 is empty or has no visible content (only whitespace, "
                                      "zero-width or formatting characters)")


def test_invisible_only_text_in_a_file_names_the_data_row(read):
    content = f"text,label\nhello,a\n{INVISIBLE},b\nthird,b\nfourth,a\n".encode()
    ex = read("d.csv", content)
    assert ex.texts[1] == INVISIBLE  # kept, so validate names every such row at once
    with pytest.raises(TrainingDataError, match=r"^the text in row\(s\) 2 is empty or has no visible content"):
        validate(ex)


def test_text_with_some_content_among_invisible_characters_is_kept():
    pairs = [(f"{label} example {i}", label) for label in "ab" for i in range(4)]
    pairs[0] = ("\u200bhi\u200b", "a")
    assert validate(examples_from_records(pairs)).n_examples == 8


def test_rows_of_only_invisible_cells_are_blank_lines(read):
    ex = read("d.csv", f"text,label\nhi,a\n{INVISIBLE},\u200b\nyo,b\n".encode())
    assert (ex.texts, ex.labels) == (["hi", "yo"], ["a", "b"])
