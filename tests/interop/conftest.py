"""Fixtures for interop tests: third-party HTTP/2 and TLS stacks against ztunnel in netns."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "e2e"))

import netns  # noqa: E402
from mesh import LogKeeper, private_ca_dir  # noqa: E402

from ztunnel.fakeca import FakeCA  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True, scope="session")
def _requires_netns() -> None:
    """ztunnel runs inside namespaces here (never on the host's ports): root needed."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def fake_ca() -> Iterator[tuple[str, FakeCA]]:
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
