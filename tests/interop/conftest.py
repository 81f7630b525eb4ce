"""Fixtures for interop tests: third-party HTTP/2 and TLS stacks against ztunnel in netns."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "e2e"))

from netns_fixtures import (  # noqa: E402, F401  (pytest finds fixtures and hooks by name)
    _requires_netns,
    fake_ca,
    mark_netns,
    network,
    pytest_runtest_makereport,
    ztunnel_logs,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_netns(items, _HERE)
