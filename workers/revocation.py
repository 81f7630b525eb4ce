"""CRL enforcement in a worker (CRL_PATH): judge each new HBONE peer, re-judge live ones on change.

Upstream `src/tls/crl.rs`, `src/tls/revocation.rs` (inventory §8.8). Every worker reads the
file itself: it is a node-local file (a ConfigMap mount), small, and a worker that starts
later must not depend on another process to learn it. The file is polled every second and
an edit is applied once it has settled (`ztunnel.filewatch`), so a change takes effect in
1-3 s (upstream: a 2 s debounce). A file that is missing or does not parse keeps the
revocations already in force, with a warning naming CRL_PATH; at start that means none.

After a handshake the glue calls `admit` with the verified peer chain: a revoked chain is
refused (counter `istio_crl_policy_rejections_total{reporter}`); an accepted one is
remembered with its connection, and every remembered connection whose chain a new CRL
revokes is torn down at once, its tunnelled connections logged with `CERT_REVOKED`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from workers.metrics import WorkerMetrics
from workers.tracking import ConnectionTracker
from workers.tunnel import H2Protocol, TunnelLeg
from ztunnel import tls
from ztunnel.core.crl import CRLError, RevocationList
from ztunnel.core.metrics import Reporter
from ztunnel.filewatch import SettledChange

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
REJECTIONS = "istio_crl_policy_rejections"
UNTRACKED = "istio_crl_untracked_connections"
REVOKED_FLAG = "CERT_REVOKED"
REVOKED_ERROR = "connection closed due to certificate revocation"


class Revocation:
    """The CRL in force in this worker, and the live HBONE connections it covers."""

    def __init__(
        self, path: str | None, metrics: WorkerMetrics, trackers: Sequence[ConnectionTracker]
    ) -> None:
        self.path = path
        self.metrics = metrics
        self.trackers = trackers  # the worker's list: pod trackers come and go
        self.crl = RevocationList()
        self._live: dict[H2Protocol, tuple[list[bytes], Reporter]] = {}
        self._change = SettledChange(path) if path else None
        if path:
            self.load()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def admit(self, conn: H2Protocol, session: tls.SSLSession, reporter: Reporter) -> str | None:
        """After the handshake: None to go on, else why the peer's chain is revoked."""
        if self.path is None:
            return None
        chain = tls.verified_chain(session)
        if chain is None:  # cannot be judged later either (upstream: "untracked")
            self.metrics.inc(UNTRACKED, (("reporter", reporter),))
            return None
        reason = self.crl.check(chain)
        if reason is not None:
            self.metrics.inc(REJECTIONS, (("reporter", reporter),))
            return reason
        self._live[conn] = (chain, reporter)
        return None

    def forget(self, conn: H2Protocol) -> None:
        self._live.pop(conn, None)

    def __len__(self) -> int:
        """Live connections being tracked."""
        return len(self._live)

    async def watch(self) -> None:
        """Poll CRL_PATH until cancelled; apply each settled edit."""
        if self._change is None:
            return
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            if self._change.poll() and self.load():
                self.recheck()

    def load(self) -> bool:
        """Read CRL_PATH; True if a new list is in force."""
        assert self.path is not None
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            log.warning(
                "CRL_PATH %s cannot be read (%s); %d revoked certificates stay in force",
                self.path,
                e.strerror or e,
                self.crl.revoked,
            )
            return False
        try:
            crl = RevocationList.parse(data)
        except CRLError as e:
            log.warning(
                "CRL_PATH %s: %s; %d revoked certificates stay in force",
                self.path,
                e,
                self.crl.revoked,
            )
            return False
        self.crl = crl
        log.info("CRL_PATH %s: %d CRLs, %d revoked certificates", self.path, crl.count, crl.revoked)
        return True

    def recheck(self) -> int:
        """Tear down every live connection whose peer is now revoked; how many."""
        revoked: dict[H2Protocol, tuple[Reporter, str]] = {}
        for conn, (chain, reporter) in self._live.items():
            reason = self.crl.check(chain)
            if reason is not None:
                revoked[conn] = (reporter, reason)
        if not revoked:
            return 0
        for tracker in self.trackers:
            for tracked in tracker:
                leg = getattr(tracked.flow, "leg", None)
                if isinstance(leg, TunnelLeg) and leg.conn in revoked:
                    tracked.response_flags = REVOKED_FLAG
                    tracked.error = REVOKED_ERROR
        for conn, (reporter, reason) in revoked.items():
            del self._live[conn]
            log.warning("closing an HBONE connection (%s): %s", reporter, reason)
            self.metrics.inc(REJECTIONS, (("reporter", reporter),))
            conn.abort()
        return len(revoked)
