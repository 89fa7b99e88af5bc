"""CI's own promises: a test whose prerequisite is missing skips on a user's clone but fails under CI=true."""
from __future__ import annotations

import pytest

from tests.conftest import require


def test_a_missing_prerequisite_skips_on_a_users_clone(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no wrk here"):
        require(False, "no wrk here")


def test_a_missing_prerequisite_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no wrk here.*CI=true"):
        require(False, "no wrk here")
    require(True, "present: neither skips nor fails")
