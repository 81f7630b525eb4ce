"""Polling a config file for edits: report a change only once it has settled.

An editor or `cp` that saves in place truncates the file and then writes it; a reader in
between sees an empty (and, for our YAML, valid and empty) config. A change is therefore
reported only after the file's mtime and size stayed the same for one more poll.
"""

from __future__ import annotations

import os

Stamp = tuple[int, int]


def stamp(path: str) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class SettledChange:
    """`poll()` is True once per edit, after the edit has settled."""

    __slots__ = ("_applied", "_seen", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self._applied = stamp(path)
        self._seen = self._applied

    def poll(self) -> bool:
        current = stamp(self.path)
        if current is None or current == self._applied:
            self._seen = current
            return False
        if current != self._seen:
            self._seen = current
            return False
        self._applied = current
        return True
