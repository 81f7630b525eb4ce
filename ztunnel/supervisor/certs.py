"""Workload certificates: which identities need one, and a cache that keeps them current.

The supervisor owns every certificate and hands it to the workers on the state channel;
workers never talk to a CA. `CertManager` is upstream's SecretManager
(`src/identity/manager.rs`) around a `CertificateSource` (the Istio CA client, or the
development CA with FAKE_CA=true):

* one entry per identity, in state Initializing, Available (a certificate) or
  Unavailable (the last error, no valid certificate);
* fetches are queued by priority, REALTIME (a caller waits in `get`) > WARMUP (prefetch
  through `want`) > BACKGROUND (refresh and retry), then by due time; at most 8 run at once
  (2 for the development CA, as upstream's mock). A higher-priority request bumps a queued
  one;
* a certificate is refreshed at half-life, `not_before + (not_after - not_before) / 2`
  (`WorkloadCertificate::refresh_at`);
* a failed fetch retries with per-identity exponential backoff (1 s, x2, jitter 0.2) capped
  at 150 s. A still-valid certificate is kept (and stays published) meanwhile, and the
  retry happens no later than its expiry (#1567). Upstream's jitter applies after the cap,
  so its retries can come 180 s apart; ours never exceed 150 s (hardening fault 6);
* when no valid certificate is left the state becomes Unavailable and the workers are told
  to drop the expired one, so new connections fail closed (hardening fault 6);
* identities no longer wanted are forgotten: the entry goes, an in-flight fetch is
  cancelled, waiters get CertificateForgotten (`the identity is no longer needed`).

Every change the workers must see is published as one `CertificatesChanged`.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509

from ztunnel.core import ipc
from ztunnel.core.config import Config
from ztunnel.core.errors import ZtunnelError
from ztunnel.core.state import ProxyState
from ztunnel.fakeca import FakeCA

log = logging.getLogger(__name__)

CONCURRENCY = 8  # concurrent CreateCertificate calls, upstream `SecretManager::new_with_client`
FAKE_CA_CONCURRENCY = 2  # upstream's mock CA
MIN_REFRESH = 1.0  # seconds; floor between a fetch and the next refresh (no hot loop on a
# certificate whose half-life has already passed, e.g. a backdated fake-CA leaf with a tiny TTL)


class CertificateSource(Protocol):
    async def fetch(self, identity: str) -> ipc.WorkloadCertificate: ...


class FakeCASource:
    """FAKE_CA=true: certificates from the shared development root in FAKE_CA_DIR."""

    def __init__(self, directory: str, ttl: float) -> None:
        self._ca = FakeCA.open(directory)
        self._ttl = ttl

    async def fetch(self, identity: str) -> ipc.WorkloadCertificate:
        return self._ca.issue(identity, ttl=self._ttl, now=time.time())


class Priority(enum.IntEnum):
    """Upstream `identity::Priority`; a larger value is served first."""

    BACKGROUND = 0  # refresh at half-life, retry after a failure
    WARMUP = 1  # prefetch of a workload's certificate
    REALTIME = 2  # a caller is waiting for it


class CertificateUnavailable(ZtunnelError):
    """No certificate for an identity: its last fetch failed and none is valid."""

    reason = "cert_unavailable"


class CertificateForgotten(CertificateUnavailable):
    """The identity stopped being wanted while a caller waited (upstream `Error::Forgotten`)."""

    reason = "cert_forgotten"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Per-identity retry delays after consecutive failures (seconds)."""

    initial: float = 1.0  # upstream's first interval (backoff `current_interval`)
    multiplier: float = 2.0
    jitter: float = 0.2  # +-20 %
    cap: float = 150.0  # CERT_REFRESH_FAILURE_RETRY_DELAY_MAX_INTERVAL

    def delay(self, failures: int, rng: random.Random) -> float:
        """The wait after the `failures`-th consecutive failure (1 for the first)."""
        base = min(self.cap, self.initial * self.multiplier ** min(failures - 1, 64))
        return min(self.cap, base * rng.uniform(1 - self.jitter, 1 + self.jitter))


def wanted_identities(state: ProxyState, config: Config) -> set[str]:
    """The identities whose certificates the supervisor keeps ready (upstream prefetch rules).

    Dedicated mode: the identity of the PROXY_WORKLOAD_INFO workload, once known (upstream
    fetches it lazily; our workers need it pushed). Shared mode (`src/cert_fetcher.rs`):
    every workload on this node (every node when NODE_NAME is unset, as upstream's
    forgetting rule reads it; upstream's prefetch then fetches nothing and relies on
    on-demand fetches) that speaks HBONE or has a native tunnel, plus ztunnel's own
    identity when POD_NAME, POD_NAMESPACE and SERVICE_ACCOUNT are all set.
    """
    if config.proxy_mode == "dedicated":
        info = config.workload_info
        if info is None:
            return set()
        local = state.find_by_info(info.name, info.namespace, info.service_account)
        return {local.identity()} if local is not None else set()
    node = config.node_name
    wanted = {
        w.identity()
        for w in state.workloads()
        if (node is None or w.node == node) and (w.protocol == "HBONE" or w.native_tunnel)
    }
    own = config.ztunnel_identity()
    if own is not None:
        wanted.add(f"spiffe://{config.trust_domain}/ns/{own.namespace}/sa/{own.service_account}")
    return wanted


@dataclass(slots=True, eq=False)
class _Entry:
    """One identity's state: Initializing (no cert, no error), Available or Unavailable."""

    priority: Priority  # of the request that created it; bumped while Initializing
    on_demand: bool = False  # created by `get` for an identity `want` did not list
    cert: ipc.WorkloadCertificate | None = None
    error: str | None = None
    failures: int = 0  # consecutive, for the backoff
    waiters: list[asyncio.Future[ipc.WorkloadCertificate]] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.cert is not None:
            return "Available"
        if self.error is not None:
            return f"Unavailable: {self.error}"
        return "Initializing"


class _Queue:
    """Pending fetches: highest priority first, then earliest due (upstream `PendingPriority`).

    A heap with lazy deletion; `_keys` holds each identity's live entry. Stale entries of
    forgotten identities would otherwise linger until their (hours away) refresh time, so
    the heap is rebuilt once they outnumber the live ones.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, str]] = []
        self._keys: dict[str, tuple[int, float, int]] = {}
        self._seq = itertools.count()  # FIFO among equal priority and due time
        self._stale = 0

    def push(self, identity: str, priority: Priority, due: float) -> None:
        """Queue `identity`, or make its queued fetch more urgent (`push_increase`)."""
        current = self._keys.get(identity)
        if current is not None:
            if (-priority, due) >= current[:2]:
                return
            self._stale += 1
        key = (-int(priority), due, next(self._seq))
        self._keys[identity] = key
        heapq.heappush(self._heap, (*key, identity))

    def remove(self, identity: str) -> None:
        if self._keys.pop(identity, None) is None:
            return
        self._stale += 1
        if self._stale > 64 and self._stale > len(self._keys):
            self._heap = [(*key, identity) for identity, key in self._keys.items()]
            heapq.heapify(self._heap)
            self._stale = 0

    def __len__(self) -> int:
        return len(self._keys)

    def peek(self) -> tuple[str, float] | None:
        """The most urgent identity and when it is due."""
        while self._heap:
            neg_priority, due, seq, identity = self._heap[0]
            if self._keys.get(identity) == (neg_priority, due, seq):
                return identity, due
            heapq.heappop(self._heap)  # superseded or removed
            self._stale = max(0, self._stale - 1)
        return None

    def pop(self) -> str:
        identity = heapq.heappop(self._heap)[3]
        del self._keys[identity]
        return identity

    def clear(self) -> None:
        self._heap.clear()
        self._keys.clear()
        self._stale = 0


class CertManager:
    """Keeps one certificate per wanted identity current and publishes every change."""

    def __init__(
        self,
        source: CertificateSource,
        publish: Callable[[ipc.CertificatesChanged], None],
        *,
        concurrency: int | None = None,
        backoff: Backoff | None = None,
        min_refresh: float = MIN_REFRESH,
        now: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if concurrency is None:
            fake = isinstance(source, FakeCASource)
            concurrency = FAKE_CA_CONCURRENCY if fake else CONCURRENCY
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.source = source
        self.publish = publish
        self.concurrency = concurrency
        self._backoff = backoff or Backoff()
        self._min_refresh = min_refresh
        self._now = now  # wall clock (certificate times); scheduling uses the loop's clock
        self._rng = rng or random.Random()
        self._entries: dict[str, _Entry] = {}
        self._queue = _Queue()
        self._inflight: dict[str, asyncio.Task[ipc.WorkloadCertificate]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False

    # -- API ------------------------------------------------------------------------------------

    def want(self, identities: Iterable[str]) -> None:
        """Reconcile: prefetch new identities (WARMUP), forget the ones no longer listed.

        Entries created by `get` for identities never listed stay until `forget`; once an
        identity has been listed, leaving the list forgets it.
        """
        if self._stopped:
            return
        wanted = set(identities)
        for identity in wanted & self._entries.keys():
            self._entries[identity].on_demand = False
        due = _loop_time()
        for identity in sorted(wanted - self._entries.keys()):
            self._entries[identity] = _Entry(priority=Priority.WARMUP)
            self._queue.push(identity, Priority.WARMUP, due)
        gone = [i for i, e in self._entries.items() if i not in wanted and not e.on_demand]
        self._publish_removed([i for i in gone if self._drop(i)])
        self._dispatch()

    async def get(
        self, identity: str, priority: Priority = Priority.REALTIME
    ) -> ipc.WorkloadCertificate:
        """The certificate for `identity`, fetching it first if needed.

        As upstream's `fetch_certificate`: an Available certificate is returned at once, an
        Unavailable identity raises CertificateUnavailable at once (retries run on their
        own backoff), an Initializing one is waited for, its queued fetch bumped to
        `priority`. Raises CertificateForgotten if the identity is forgotten meanwhile.
        """
        if self._stopped:
            raise CertificateUnavailable("certificate manager stopped")
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._entries[identity] = _Entry(priority=priority, on_demand=True)
            self._queue.push(identity, priority, _loop_time())
            self._dispatch()
        elif entry.cert is not None:
            return entry.cert
        elif entry.error is not None:
            raise CertificateUnavailable(entry.error)
        elif priority > entry.priority:
            entry.priority = priority
            if identity not in self._inflight:
                self._queue.push(identity, priority, _loop_time())
                self._dispatch()
        waiter: asyncio.Future[ipc.WorkloadCertificate] = asyncio.get_running_loop().create_future()
        entry.waiters.append(waiter)
        return await waiter

    def forget(self, identity: str) -> None:
        """Stop keeping `identity`'s certificate (upstream `forget_certificate`)."""
        if self._drop(identity):
            self._publish_removed([identity])
        self._dispatch()

    def snapshot(self) -> tuple[ipc.WorkloadCertificate, ...]:
        """Every published certificate, for a worker's full snapshot."""
        return tuple(e.cert for _, e in sorted(self._entries.items()) if e.cert is not None)

    def dump(self) -> list[dict[str, object]]:
        """config_dump `certificates`: upstream `CertsDump`, sorted by identity."""
        out: list[dict[str, object]] = []
        for identity, entry in sorted(self._entries.items()):
            cert = entry.cert
            out.append(
                {
                    "identity": identity,
                    "state": entry.state,
                    "certChain": [cert_dump(p) for p in cert.chain_pem] if cert else [],
                    "rootCerts": [cert_dump(p) for p in cert.roots_pem] if cert else [],
                }
            )
        return out

    def stop(self) -> None:
        """Cancel every fetch and timer; waiters fail. Published certificates stay readable."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = list(self._inflight.values())
        self._inflight.clear()
        for task in tasks:
            task.cancel()
        self._queue.clear()
        for entry in self._entries.values():
            _reject(entry.waiters, CertificateUnavailable("certificate manager stopped"))

    # -- scheduling -----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start due fetches while there is room; otherwise arm a timer for the next one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stopped:
            return
        loop = asyncio.get_running_loop()
        while len(self._inflight) < self.concurrency:
            head = self._queue.peek()
            if head is None:
                return
            identity, due = head
            if due > loop.time():
                self._timer = loop.call_at(due, self._dispatch)
                return
            self._queue.pop()
            task = loop.create_task(self.source.fetch(identity), name=f"cert fetch {identity}")
            self._inflight[identity] = task
            task.add_done_callback(functools.partial(self._fetched, identity))

    def _fetched(self, identity: str, task: asyncio.Task[ipc.WorkloadCertificate]) -> None:
        if self._inflight.get(identity) is not task:
            if not task.cancelled():
                task.exception()  # forgotten meanwhile: drop the result, mark it retrieved
            return
        del self._inflight[identity]
        entry = self._entries[identity]  # forgetting removes the task from _inflight
        if task.cancelled():
            self._failed(identity, entry, "certificate fetch cancelled")
        elif (exc := task.exception()) is not None:
            if not isinstance(exc, ZtunnelError | OSError):
                log.error("certificate fetch for %s crashed", identity, exc_info=exc)
            self._failed(identity, entry, str(exc) or type(exc).__name__)
        else:
            cert = task.result()
            if cert.identity != identity:
                self._failed(identity, entry, f"source returned a certificate for {cert.identity}")
            else:
                self._succeeded(identity, entry, cert)
        self._dispatch()

    def _succeeded(self, identity: str, entry: _Entry, cert: ipc.WorkloadCertificate) -> None:
        entry.failures = 0
        entry.cert, entry.error = cert, None
        self.publish(ipc.CertificatesChanged(updated=(cert,)))
        _resolve(entry.waiters, cert)
        log.info("certificate for %s valid until %s", identity, _rfc3339(cert.not_after))
        # Half-life from when the certificate became usable to us. CAs backdate not_before
        # (istiod by 2 minutes, ours by 60 s) for clock skew; measured from the backdated
        # start, a short SECRET_TTL would put the half-life in the past and renew every
        # second (upstream `refresh_at` has that quirk).
        start = max(cert.not_before, min(self._now(), cert.not_after))
        if cert.not_after >= start:
            refresh_at = start + (cert.not_after - start) / 2
        else:
            refresh_at = cert.not_after  # as upstream for a backwards validity
        delay = max(self._min_refresh, refresh_at - self._now())
        self._queue.push(identity, Priority.BACKGROUND, _loop_time() + delay)

    def _failed(self, identity: str, entry: _Entry, error: str) -> None:
        entry.failures += 1
        retry = self._backoff.delay(entry.failures, self._rng)
        now = self._now()
        cert = entry.cert
        if cert is not None and cert.not_after > now:
            retry = min(retry, cert.not_after - now)
            log.info(
                "certificate renewal for %s failed (%s); keeping the current certificate "
                "until %s, next retry in %.1fs",
                identity,
                error,
                _rfc3339(cert.not_after),
                retry,
            )
        else:
            entry.cert, entry.error = None, error
            if cert is not None:
                self._publish_removed([identity])  # expired: fail closed
            _reject(entry.waiters, CertificateUnavailable(error))
            log.warning(
                "certificate fetch for %s failed (%s) and no valid certificate is left; "
                "retrying in %.1fs (backoff capped at %.0fs)",
                identity,
                error,
                retry,
                self._backoff.cap,
            )
        self._queue.push(identity, Priority.BACKGROUND, _loop_time() + retry)

    def _drop(self, identity: str) -> bool:
        """Forget an entry; True if the workers hold a certificate for it."""
        entry = self._entries.pop(identity, None)
        if entry is None:
            return False
        self._queue.remove(identity)
        task = self._inflight.pop(identity, None)
        if task is not None:
            task.cancel()
        _reject(entry.waiters, CertificateForgotten("the identity is no longer needed"))
        if entry.cert is not None:
            log.info("forgetting certificate for %s", identity)
        return entry.cert is not None

    def _publish_removed(self, identities: list[str]) -> None:
        if identities:
            self.publish(ipc.CertificatesChanged(removed=tuple(identities)))


# --- helpers -------------------------------------------------------------------------------


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


def _resolve(
    waiters: list[asyncio.Future[ipc.WorkloadCertificate]], cert: ipc.WorkloadCertificate
) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(cert)
    waiters.clear()


def _reject(waiters: list[asyncio.Future[ipc.WorkloadCertificate]], error: ZtunnelError) -> None:
    # A new exception per waiter: raising one instance in many tasks chains their tracebacks.
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(type(error)(*error.args))
    waiters.clear()


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def cert_dump(pem: str) -> dict[str, str]:
    """Upstream `CertDump`: base64 of the PEM, decimal serial, RFC 3339 validity (seconds)."""
    out = {
        "pem": base64.b64encode(pem.encode()).decode(),
        "serialNumber": "",
        "validFrom": "",
        "expirationTime": "",
    }
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return out  # never fail the admin page over one certificate
    out["serialNumber"] = str(cert.serial_number)
    out["validFrom"] = _rfc3339(cert.not_valid_before_utc.timestamp())
    out["expirationTime"] = _rfc3339(cert.not_valid_after_utc.timestamp())
    return out
