"""The LOCAL_XDS_PATH / LOCAL_XDS state source: loaded once at start, as upstream."""

from __future__ import annotations

import logging

from ztunnel.core.config import Config
from ztunnel.core.errors import ConfigError
from ztunnel.core.localconfig import load_local_config, parse_local_config
from ztunnel.core.model import StateDelta, StateSnapshot

log = logging.getLogger(__name__)


class LocalSource:
    def __init__(self, config: Config) -> None:
        self.path = config.local_xds_path
        self.inline = config.local_xds

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
