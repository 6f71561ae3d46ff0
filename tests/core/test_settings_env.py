"""Numbers from ``HEADFLEET_*`` variables: a value that is not one is a clear error naming the
variable (the CLI's exit 2), never a traceback at start-up; unset or empty keeps the default."""

from __future__ import annotations

import pytest

from headfleet.errors import ValidationError
from headfleet.settings import Settings


@pytest.mark.parametrize("name, value, kind", [("WORKERS", "abc", "an integer"), ("WORKERS", "2.5", "an integer"),
                                               ("MAX_LENGTH", "lots", "an integer"), ("PORT", "80a", "an integer"),
                                               ("MAX_TEXTS_PER_REQUEST", "1e3", "an integer"),
                                               ("MEMORY_CACHE_MB", "big", "a number"),
                                               ("MONITOR_INTERVAL_S", "soon", "a number")])
def test_a_variable_that_is_not_a_number_names_itself(monkeypatch, tmp_path, name, value, kind):
    monkeypatch.setenv("HEADFLEET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(f"HEADFLEET_{name}", value)
    with pytest.raises(ValidationError, match=f"HEADFLEET_{name} must be {kind}, not '{value}'"):
        Settings.from_env()


def test_unset_or_empty_keeps_the_default_and_a_number_is_read(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADFLEET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HEADFLEET_WORKERS", "")
    monkeypatch.delenv("HEADFLEET_THREADS", raising=False)
    monkeypatch.setenv("HEADFLEET_MEMORY_CACHE_MB", "64.5")
    s = Settings.from_env()
    assert (s.workers, s.threads, s.memory_cache_mb) == (1, None, 64.5)
    monkeypatch.setenv("HEADFLEET_WORKERS", " 3 ")
    assert Settings.from_env().workers == 3
