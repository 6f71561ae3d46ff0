"""The one rule for "a text with content", checked against the backbone's own tokenizer."""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer

from headfleet.embedder import default_model_path
from headfleet.text import blank_message, is_blank, is_blank_char, visible_pattern

PLANES = [range(0x0000, 0x40000), range(0xE0000, 0xF0000)]  # BMP, SMP, SIP, TIP, and tags/selectors


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    tok.no_padding()  # the shipped file pads to 128: count real tokens only
    tok.no_truncation()
    return tok


def test_every_character_the_tokenizer_drops_is_blank(tokenizer):
    """If the backbone would see nothing of a character, the service must refuse a text of only it."""
    chars = [chr(cp) for plane in PLANES for cp in plane if not 0xD800 <= cp <= 0xDFFF]
    dropped = []
    for i in range(0, len(chars), 8192):
        batch = chars[i:i + 8192]
        for ch, enc in zip(batch, tokenizer.encode_batch(batch, add_special_tokens=False)):
            if not enc.ids:
                dropped.append(ch)
    assert len(dropped) > 500  # whitespace, controls, format characters, combining marks, ...
    missed = [f"U+{ord(c):04X}" for c in dropped if not is_blank_char(c)]
    assert missed == []


@pytest.mark.parametrize("text", ["\u200b\u200c\u200d\ufeff", "", " \t\n", "\u2060\u00ad", "\u3164\u115f",
                                  "\u2800", "\u0301\u0302", "\ufe0f", "\U000e0041\U000e007f", "\u202e\u200e"])
def test_texts_of_invisible_characters_are_blank(text):
    assert is_blank(text)


@pytest.mark.parametrize("text", ["a", " x ", "\u200bhi", "\U0001f600", "中", "\u00e9", "!", "0"])
def test_texts_with_one_visible_character_are_not(text):
    assert not is_blank(text)


def test_the_documented_pattern_agrees_with_the_rule():
    pattern = re.compile(visible_pattern())
    samples = ["\u200b\u200c", "a", "\u0301", " \u3164 x", "\x13", "\U000e0001", "\U0001f600", "\u2800\u2800",
               "\ufeffword", "\U00030000", "\U000e0100"]
    for s in samples:
        assert bool(pattern.search(s)) == (not is_blank(s)), repr(s)


def test_the_refusal_names_the_field():
    assert blank_message("texts[3]").startswith("texts[3] is empty or has no visible content")
