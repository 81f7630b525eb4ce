"""A config file edit is reported once, and only after it has settled."""

from __future__ import annotations

import os
from pathlib import Path

from ztunnel.filewatch import SettledChange


def _touch(path: Path, text: str, ns: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(ns, ns))


def test_unchanged_file_reports_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    _touch(path, "a", 1_000_000_000)
    change = SettledChange(str(path))
    assert not change.poll()
    assert not change.poll()


def test_edit_is_reported_after_one_quiet_poll_and_only_once(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    _touch(path, "a", 1_000_000_000)
    change = SettledChange(str(path))
    _touch(path, "", 2_000_000_000)  # truncated mid-save
    assert not change.poll()
    _touch(path, "abc", 3_000_000_000)  # written: still moving
    assert not change.poll()
    assert change.poll()  # settled
    assert not change.poll()


def test_missing_file_is_not_a_change(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    _touch(path, "a", 1_000_000_000)
    change = SettledChange(str(path))
    path.unlink()
    assert not change.poll()
    assert not change.poll()
