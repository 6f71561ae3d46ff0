"""Which texts share a cache entry, and which must not."""

from __future__ import annotations

import pytest

from headfleet.cache import content_key, normalise_text


def key(text: str, fp: str = "fp", ns: str = "ns", max_length: int = 256) -> bytes:
    return content_key(fp, ns, max_length, normalise_text(text))


@pytest.mark.parametrize(
    "a, b",
    [
        ("hello world", "  hello \n\t world  "),
        ("caf\u00e9 au lait", "cafe\u0301 au lait"),  # composed vs. combining accent
        ("a b", "a\u00a0b"),  # no-break space is whitespace too
    ],
)
def test_equivalent_texts_share_a_key(a: str, b: str) -> None:
    assert normalise_text(a) == normalise_text(b)
    assert key(a) == key(b)


def test_key_is_16_bytes() -> None:
    assert len(key("x")) == 16


@pytest.mark.parametrize(
    "other",
    [
        dict(text="hello worlds"),
        dict(fp="fp2"),
        dict(ns="other-tenant"),
        dict(max_length=128),
        dict(text="Hello world"),  # case is meaningful to a cased backbone
    ],
)
def test_any_field_change_gives_a_different_key(other: dict) -> None:
    base = dict(text="hello world", fp="fp", ns="ns", max_length=256)
    assert key(**base) != key(**{**base, **other})


def test_fields_cannot_bleed_into_each_other() -> None:
    # With a plain separator join both tuples would serialise to fp|A|7|256|t.
    assert content_key("fp", "A\x1f7", 256, "t") != content_key("fp", "A", 7, "256\x1ft")
    assert content_key("fp", "ab", 1, "c") != content_key("fp", "a", 1, "bc")


def test_max_length_must_be_an_int() -> None:
    with pytest.raises(TypeError, match="max_length must be an int"):
        content_key("fp", "ns", "256", "t")  # type: ignore[arg-type]
