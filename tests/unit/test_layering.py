"""DESIGN §2 import rules, enforced by walking every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE_FORBIDDEN = (
    "asyncio",
    "socket",
    "ssl",
    "zmq",
    "grpc",
    "uvloop",
    "prometheus_client",
    "selectors",
)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(package: str) -> list[Path]:
    base = ROOT / package
    return (
        [p for p in base.rglob("*.py") if "gen" not in p.relative_to(ROOT).parts]
        if base.exists()
        else []
    )


def _violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in _modules(package):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_core_does_no_io() -> None:
    assert _modules("ztunnel/core"), "ztunnel/core not found"
    assert _violations("ztunnel/core", CORE_FORBIDDEN) == []


def test_core_imports_nothing_above_it() -> None:
    assert (
        _violations(
            "ztunnel/core", ("ztunnel.supervisor", "workers", "controlplane", "ztunnel.telemetry")
        )
        == []
    )


def test_workers_never_import_supervisor_controlplane_or_grpc() -> None:
    assert _modules("workers")
    assert _violations("workers", ("ztunnel.supervisor", "controlplane", "grpc")) == []


def test_controlplane_never_imports_workers() -> None:
    if not _modules("controlplane"):
        pytest.skip("controlplane package not present")
    assert _violations("controlplane", ("workers",)) == []


def test_supervisor_does_not_import_the_worker_package() -> None:
    assert _violations("ztunnel/supervisor", ("workers",)) == []
