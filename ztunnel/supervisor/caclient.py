"""Istio CA client (placeholder until the client lands; refuses to start)."""

from __future__ import annotations

from ztunnel.core import ipc
from ztunnel.core.config import Config
from ztunnel.core.errors import ConfigError


class CAClient:
    def __init__(self, config: Config) -> None:
        if config.ca_address is not None:
            raise ConfigError(f"CA_ADDRESS={config.ca_address}: no CA client in this build")

    async def fetch(self, identity: str) -> ipc.WorkloadCertificate:
        raise ConfigError("no CA configured: set FAKE_CA=true")
