"""`sockets.enable_listener_migration` against a stand-in for the sysctl file."""

from __future__ import annotations

from pathlib import Path

from ztunnel.sockets import enable_listener_migration


def test_turns_the_sysctl_on_once(tmp_path: Path) -> None:
    sysctl = tmp_path / "tcp_migrate_req"
    sysctl.write_text("0\n")
    assert enable_listener_migration(str(sysctl)) == (True, None)
    assert sysctl.read_text() == "1"
    assert enable_listener_migration(str(sysctl)) == (False, None)  # already on: no write


def test_reports_why_it_cannot(tmp_path: Path) -> None:
    changed, why = enable_listener_migration(str(tmp_path / "missing"))
    assert not changed
    assert why == "No such file or directory"
