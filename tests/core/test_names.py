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
