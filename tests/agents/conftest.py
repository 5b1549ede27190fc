"""Fixtures shared by the built-in agents' tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agents.oncall.status_service import StatusService


@pytest.fixture
def status(monkeypatch: pytest.MonkeyPatch) -> Iterator[StatusService]:
    """The on-call agent's service-status API on a free port, for this test."""
    with StatusService() as svc:
        monkeypatch.setenv("ONCALL_STATUS_URL", svc.url)
        yield svc
