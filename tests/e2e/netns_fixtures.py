"""Fixtures and hooks shared by the suites that run ztunnel in network namespaces.

`tests/e2e/conftest.py` and `tests/interop/conftest.py` import them (pytest finds fixtures
and hooks in a conftest by name, wherever they were defined).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netns
import pytest
from mesh import LogKeeper, private_ca_dir

from ztunnel.fakeca import FakeCA


def mark_netns(items: list[pytest.Item], directory: Path) -> None:
    """Mark the tests under `directory` `netns` (root, `ip netns`)."""
    for item in items:
        if directory in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True, scope="session")
def _requires_netns() -> None:
    """Every test here needs root and working `ip netns`; say why when skipping."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def fake_ca() -> Iterator[tuple[str, FakeCA]]:
    """(FAKE_CA_DIR, its root): shared by every ztunnel and raw client of the session."""
    with private_ca_dir() as ca:
        yield ca


@pytest.fixture
def network() -> Iterator[netns.Network]:
    with netns.Network() as net:
        yield net


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember each phase's outcome on the item, for `ztunnel_logs`."""
    report = yield
    setattr(item, f"_zte2e_{report.when}", report)
    return report


@pytest.fixture
def ztunnel_logs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogKeeper]:
    """Register ztunnels; their logs land in tmp_path, and on failure in the report."""
    keeper = LogKeeper(tmp_path)
    yield keeper
    call = getattr(request.node, "_zte2e_call", None)
    keeper.finish(failed=call is None or call.failed)
