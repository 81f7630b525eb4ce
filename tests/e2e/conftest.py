"""Fixtures for namespace tests: skip without root, a private CA, namespaces that always go."""

from __future__ import annotations

from pathlib import Path

import pytest
from netns_fixtures import (  # noqa: F401  (pytest finds fixtures and hooks by name)
    _requires_netns,
    fake_ca,
    mark_netns,
    network,
    pytest_runtest_makereport,
    ztunnel_logs,
)

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_netns(items, _HERE)
