"""The name rules every layer uses: a name that would pass here becomes a folder and a key part."""

import pytest

from headfleet.errors import ValidationError
from headfleet.names import check_alias, check_name


@pytest.mark.parametrize("bad", ["acme\n", "acme\r\n", "\nacme", "ac me", "Acme", ".hidden", "", "a" * 65, "a/b",
                                 "a\\b", "..", "spam\x00", "spa\u00dfm", 3])
def test_names_that_are_not_one_path_component_are_refused(bad):
    with pytest.raises(ValidationError):
        check_name(bad, "classifier name")


@pytest.mark.parametrize("bad", ["prod\n", "1", "Prod", "-x", "a" * 33, ""])
def test_aliases_are_checked_the_same_way(bad):
    with pytest.raises(ValidationError):
        check_alias(bad)


def test_ordinary_names_pass_unchanged():
    assert check_name("acme-2.eu_west", "tenant") == "acme-2.eu_west"
    assert check_alias("candidate") == "candidate"


def test_a_refused_name_is_quoted_clipped_with_its_length():
    with pytest.raises(ValidationError) as e:
        check_name("x" * 100_000, "classifier name")
    assert len(str(e.value)) < 300 and "'xxxx" in str(e.value) and "100,000 characters" in str(e.value)
    with pytest.raises(ValidationError, match="'Prod'"):  # a short one is quoted whole, as before
        check_alias("Prod")


def test_a_long_error_message_keeps_its_start_and_its_end():
    """Every domain error is clipped in the middle: a message quoting a huge input keeps the reason
    and the fix that follow the quote (a path of 5,000 characters, then "too long: ...")."""
    from headfleet.errors import ValidationError as Refused

    e = Refused("source " + repr("d/" * 2_500) + " is too long: use a path under 4,096 bytes")
    assert len(e.message) < 2_100 and str(e) == e.message
    assert e.message.startswith("source 'd/d/") and e.message.endswith("use a path under 4,096 bytes")
    assert "characters cut" in e.message
