"""Delta xDS client (placeholder until the client lands; refuses to start)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry

from ztunnel.core.config import Config
from ztunnel.core.errors import ConfigError
from ztunnel.core.model import StateDelta
from ztunnel.core.state import ProxyState


class XDSClient:
    def __init__(
        self,
        config: Config,
        *,
        state: Callable[[], ProxyState],
        on_update: Callable[[StateDelta], None],
        on_synced: Callable[[], None],
        registry: CollectorRegistry | None,
    ) -> None:
        raise ConfigError(f"XDS_ADDRESS={config.xds_address}: no xDS client in this build")

    async def run(self) -> None:
        raise NotImplementedError
