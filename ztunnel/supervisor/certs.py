"""Workload certificates: which identities need one, fetching, refresh at half-life, forgetting.

The supervisor owns every certificate and hands it to the workers on the state channel;
workers never talk to a CA. The source is a seam: the development CA (FAKE_CA=true) now,
the Istio CA client (CreateCertificate) behind the same `CertificateSource` protocol later.
Refresh is scheduled at `not_before + (not_after - not_before) / 2` as upstream
(`WorkloadCertificate::refresh_at`); a failed fetch retries with backoff capped at 150 s and
keeps a still-valid certificate meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

from ztunnel.core import ipc
from ztunnel.core.errors import ZtunnelError
from ztunnel.fakeca import FakeCA

log = logging.getLogger(__name__)

RETRY_INITIAL = 1.0  # seconds
RETRY_MAX = 150.0  # upstream's cap (src/identity/manager.rs)


class CertificateSource(Protocol):
    async def fetch(self, identity: str) -> ipc.WorkloadCertificate: ...


class FakeCASource:
    """FAKE_CA=true: certificates from the shared development root in FAKE_CA_DIR."""

    def __init__(self, directory: str, ttl: float) -> None:
        self._ca = FakeCA.open(directory)
        self._ttl = ttl

    async def fetch(self, identity: str) -> ipc.WorkloadCertificate:
        return self._ca.issue(identity, ttl=self._ttl, now=time.time())


class CertManager:
    """Keeps one certificate per wanted identity current and publishes every change."""

    def __init__(
        self, source: CertificateSource, publish: Callable[[ipc.CertificatesChanged], None]
    ) -> None:
        self.source = source
        self.publish = publish
        self.certs: dict[str, ipc.WorkloadCertificate] = {}
        self.errors: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def want(self, identities: set[str]) -> None:
        """Reconcile: start keeping new identities, forget ones no longer needed."""
        for identity in identities - self._tasks.keys():
            self._tasks[identity] = asyncio.get_running_loop().create_task(
                self._keep(identity), name=f"cert {identity}"
            )
        gone = [i for i in self._tasks if i not in identities]
        for identity in gone:
            self._tasks.pop(identity).cancel()
            self.errors.pop(identity, None)
            if self.certs.pop(identity, None) is not None:
                log.info("forgetting certificate for %s", identity)
                self.publish(ipc.CertificatesChanged(removed=(identity,)))

    def snapshot(self) -> tuple[ipc.WorkloadCertificate, ...]:
        return tuple(self.certs.values())

    def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    async def _keep(self, identity: str) -> None:
        backoff = RETRY_INITIAL
        while True:
            try:
                cert = await self.source.fetch(identity)
            except (ZtunnelError, OSError) as e:
                self.errors[identity] = str(e)
                delay = self._retry_delay(identity, backoff)
                log.warning(
                    "failed to fetch certificate for %s: %s; retrying in %.1fs", identity, e, delay
                )
                backoff = min(backoff * 2, RETRY_MAX)
                await asyncio.sleep(delay)
                continue
            backoff = RETRY_INITIAL
            self.errors.pop(identity, None)
            self.certs[identity] = cert
            self.publish(ipc.CertificatesChanged(updated=(cert,)))
            log.info(
                "certificate for %s valid until %s",
                identity,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cert.not_after)),
            )
            refresh_at = cert.not_before + (cert.not_after - cert.not_before) / 2
            await asyncio.sleep(max(0.0, refresh_at - time.time()))

    def _retry_delay(self, identity: str, backoff: float) -> float:
        jittered = backoff * random.uniform(0.8, 1.2)
        current = self.certs.get(identity)
        if current is None:
            return jittered
        # Keep the old certificate while the CA is down, but retry before it expires.
        return max(0.1, min(jittered, current.not_after - time.time()))

    def dump(self) -> list[dict[str, object]]:
        """config_dump `certificates` entries (state only; PEM details come with the CA client)."""
        out: list[dict[str, object]] = []
        for identity in sorted(self._tasks):
            if identity in self.certs:
                state = "Available"
            elif identity in self.errors:
                state = f"Unavailable: {self.errors[identity]}"
            else:
                state = "Initializing"
            out.append({"identity": identity, "state": state})
        return out
