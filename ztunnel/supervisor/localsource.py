"""The LOCAL_XDS_PATH / LOCAL_XDS state source.

Upstream reads the file once at start. We also watch LOCAL_XDS_PATH and apply an edited
file as a delta (changed and new resources upserted, missing ones removed), so policies and
workloads can be changed on a running ztunnel without istiod; a file that fails to parse is
logged and ignored, and the last good state stays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ztunnel.core.config import Config
from ztunnel.core.errors import ConfigError
from ztunnel.core.localconfig import load_local_config, parse_local_config
from ztunnel.core.model import StateDelta, StateSnapshot
from ztunnel.filewatch import SettledChange

WATCH_INTERVAL = 0.1  # seconds between checks of the file's mtime and size (a stat)

log = logging.getLogger(__name__)


class LocalSource:
    def __init__(self, config: Config) -> None:
        self.path = config.local_xds_path
        self.inline = config.local_xds
        self.current = StateSnapshot()
        self._change = SettledChange(self.path) if self.path is not None else None

    def _read(self) -> StateSnapshot | None:
        if self.path is not None:
            return load_local_config(self.path)
        if self.inline is not None:
            return parse_local_config(self.inline, source="LOCAL_XDS")
        return None

    def load(self) -> StateDelta:
        """The local config as one delta of upserts (empty when none is configured)."""
        snap = self._read()
        if snap is None:
            return StateDelta()
        self.current = snap
        log.info(
            "loaded local config: %d workloads, %d services, %d policies",
            len(snap.workloads),
            len(snap.services),
            len(snap.policies),
        )
        return StateDelta(workloads=snap.workloads, services=snap.services, policies=snap.policies)

    def reread(self) -> StateSnapshot | None:
        """For config_dump's `staticConfig`: read again, as upstream does; errors give None."""
        try:
            return self._read()
        except ConfigError as e:
            log.warning("re-reading local config failed: %s", e)
            return None

    async def watch(self, apply: Callable[[StateDelta], None]) -> None:
        """Apply edits of LOCAL_XDS_PATH until cancelled."""
        if self.path is None:
            return
        change = self._change or SettledChange(self.path)
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if not change.poll():
                continue
            try:
                snap = load_local_config(self.path)
            except ConfigError as e:
                log.error("local config changed but is invalid, keeping the last good one: %s", e)
                continue
            delta = diff(self.current, snap)
            self.current = snap
            if not delta.is_empty():
                log.info("local config changed: applying %s", _summary(delta))
                apply(delta)


def diff(old: StateSnapshot, new: StateSnapshot) -> StateDelta:
    """The delta that turns `old` into `new`: upsert what changed, remove what is gone."""
    ow = {w.uid: w for w in old.workloads}
    nw = {w.uid: w for w in new.workloads}
    osv = {s.key(): s for s in old.services}
    nsv = {s.key(): s for s in new.services}
    op = {p.key(): p for p in old.policies}
    np = {p.key(): p for p in new.policies}
    return StateDelta(
        workloads=tuple(w for k, w in nw.items() if ow.get(k) != w),
        services=tuple(s for k, s in nsv.items() if osv.get(k) != s),
        policies=tuple(p for k, p in np.items() if op.get(k) != p),
        removed_workloads=tuple(k for k in ow if k not in nw),
        removed_services=tuple(k for k in osv if k not in nsv),
        removed_policies=tuple(k for k in op if k not in np),
    )


def _summary(d: StateDelta) -> str:
    return (
        f"{len(d.workloads)} workloads, {len(d.services)} services, {len(d.policies)} policies "
        f"upserted; {len(d.removed_workloads)}, {len(d.removed_services)}, "
        f"{len(d.removed_policies)} removed"
    )
