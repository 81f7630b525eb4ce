"""The certificate cache (upstream SecretManager) and the prefetch rules.

Time is real but short: certificates live for fractions of a second and the backoff is
scaled down through `Backoff`, so each test runs in well under two seconds.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from cryptography import x509

from ztunnel.core import ipc
from ztunnel.core.config import Config
from ztunnel.core.errors import ZtunnelError
from ztunnel.core.model import StateDelta, Workload
from ztunnel.core.state import ProxyState
from ztunnel.fakeca import FakeCA
from ztunnel.supervisor.certs import (
    CONCURRENCY,
    FAKE_CA_CONCURRENCY,
    Backoff,
    CertificateForgotten,
    CertificateUnavailable,
    CertManager,
    FakeCASource,
    Priority,
    _Queue,
    wanted_identities,
)

pytestmark = pytest.mark.timeout(20)

NO_MESH = "/nonexistent/mesh"
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
FAST = Backoff(initial=0.02, multiplier=2.0, jitter=0.0, cap=0.1)


def ident(name: str) -> str:
    return f"spiffe://cluster.local/ns/test/sa/{name}"


class CADown(ZtunnelError):
    reason = "test"


class FakeSource:
    """A controllable CA: latency, a gate, failures, validity; records every fetch."""

    def __init__(self, *, ttl: float | None = 0.4, latency: float = 0.0) -> None:
        self.ca = FakeCA.ephemeral()
        self.ttl = ttl  # None: the real X.509 validity (whole seconds, 1 h)
        self.latency = latency
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: BaseException | None = None
        self.fetches: list[str] = []
        self.times: list[float] = []  # monotonic start of each fetch
        self.active = 0
        self.max_active = 0

    async def fetch(self, identity: str) -> ipc.WorkloadCertificate:
        self.fetches.append(identity)
        self.times.append(time.monotonic())
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.gate.wait()
            if self.latency:
                await asyncio.sleep(self.latency)
            if self.fail is not None:
                raise self.fail
            now = time.time()
            cert = self.ca.issue(identity, ttl=3600, now=now)
            if self.ttl is None:
                return cert
            return msgspec.structs.replace(cert, not_before=now, not_after=now + self.ttl)
        finally:
            self.active -= 1


class Published:
    """Records what the manager publishes to the workers."""

    def __init__(self) -> None:
        self.messages: list[ipc.CertificatesChanged] = []

    def __call__(self, msg: ipc.CertificatesChanged) -> None:
        self.messages.append(msg)

    def updated(self, identity: str) -> list[ipc.WorkloadCertificate]:
        return [c for m in self.messages for c in m.updated if c.identity == identity]

    def removed(self, identity: str) -> int:
        return sum(identity in m.removed for m in self.messages)


def manager(source: FakeSource, published: Published, **kw: Any) -> CertManager:
    kw.setdefault("backoff", FAST)
    kw.setdefault("min_refresh", 0.01)
    return CertManager(source, published, **kw)


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def settle() -> None:
    """Let every ready task run up to its next real wait."""
    for _ in range(5):
        await asyncio.sleep(0)


def _state(m: CertManager, identity: str) -> str:
    return next(str(e["state"]) for e in m.dump() if e["identity"] == identity)


# --- prefetch, refresh, publish ---------------------------------------------------------------


async def test_want_prefetches_and_publishes_each_certificate() -> None:
    source, published = FakeSource(ttl=60), Published()
    m = manager(source, published)
    m.want({ident("a"), ident("b")})
    await until(lambda: len(m.snapshot()) == 2)
    assert sorted(source.fetches) == [ident("a"), ident("b")]
    assert [c.identity for c in m.snapshot()] == [ident("a"), ident("b")]
    assert len(published.updated(ident("a"))) == 1
    m.want({ident("a"), ident("b")})  # unchanged: no new fetch
    await settle()
    assert len(source.fetches) == 2
    m.stop()


async def test_half_life_refresh_publishes_a_new_certificate() -> None:
    source, published = FakeSource(ttl=0.4), Published()
    m = manager(source, published)
    m.want({ident("a")})
    await until(lambda: len(published.updated(ident("a"))) == 2)
    first, second = published.updated(ident("a"))[:2]
    assert first.chain_pem != second.chain_pem
    refreshed_after = source.times[1] - source.times[0]
    assert 0.15 < refreshed_after < 0.4  # at half-life (0.2 s), not at once, not at expiry
    m.stop()


async def test_ca_down_keeps_valid_certificate_backs_off_then_fails_closed() -> None:
    source, published = FakeSource(ttl=1.0), Published()
    m = manager(source, published)
    m.want({ident("a")})
    await until(lambda: len(published.updated(ident("a"))) == 1)
    cert = m.snapshot()[0]
    source.fail = CADown("CA down")
    # Refresh at 0.5 s fails; retries 0.02, 0.04, 0.08, then 0.1 (the cap) apart.
    await until(lambda: len(source.fetches) >= 6)
    assert _state(m, ident("a")) == "Available"
    assert await m.get(ident("a")) == cert  # still served while valid
    assert published.removed(ident("a")) == 0
    gaps = [b - a for a, b in zip(source.times[1:], source.times[2:], strict=False)]
    # Timers never fire early; a busy machine may make them late, hence loose upper bounds.
    assert 0.018 <= gaps[0] < 0.06
    assert gaps[1] >= 0.038
    assert gaps[2] >= 0.078
    assert all(g <= 0.1 + 0.05 for g in gaps)
    # At expiry the certificate is withdrawn: new connections fail closed.
    await until(lambda: published.removed(ident("a")) == 1, within=2)
    assert m.snapshot() == ()
    assert _state(m, ident("a")) == "Unavailable: CA down"
    with pytest.raises(CertificateUnavailable, match="CA down"):
        await m.get(ident("a"))
    # The CA comes back: the next retry (at most the cap away) restores it.
    source.fail = None
    await until(lambda: len(published.updated(ident("a"))) == 2, within=1)
    assert _state(m, ident("a")) == "Available"
    m.stop()


async def test_backoff_restarts_after_a_success() -> None:
    source, published = FakeSource(ttl=0.3), Published()
    m = manager(source, published)
    source.fail = CADown("CA down")
    m.want({ident("a")})
    await until(lambda: len(source.fetches) >= 5)  # delays grew to the cap
    source.fail = None
    await until(lambda: len(published.updated(ident("a"))) == 1)
    source.fail = CADown("CA down")
    n = len(source.fetches)
    await until(lambda: len(source.fetches) >= n + 2)  # refresh at half-life, then a retry
    assert 0.018 <= source.times[n + 1] - source.times[n] < 0.05  # back to the first step
    m.stop()


@pytest.mark.parametrize(
    ("failures", "low", "high"),
    [(1, 0.8, 1.2), (2, 1.6, 2.4), (3, 3.2, 4.8), (8, 102.4, 150.0), (9, 120.0, 150.0)],
)
def test_backoff_grows_with_jitter_and_never_exceeds_the_cap(
    failures: int, low: float, high: float
) -> None:
    class Edge:
        def __init__(self, pick: int) -> None:
            self.pick = pick

        def uniform(self, a: float, b: float) -> float:
            return (a, b)[self.pick]

    backoff = Backoff()
    assert backoff.delay(failures, Edge(0)) == pytest.approx(low)  # type: ignore[arg-type]
    assert backoff.delay(failures, Edge(1)) == pytest.approx(high)  # type: ignore[arg-type]
    assert backoff.delay(10_000, Edge(1)) == 150.0  # type: ignore[arg-type]


# --- forgetting ----------------------------------------------------------------------------


async def test_forget_publishes_removal_and_drops_the_entry() -> None:
    source, published = FakeSource(ttl=60), Published()
    m = manager(source, published)
    m.want({ident("a"), ident("b")})
    await until(lambda: len(m.snapshot()) == 2)
    m.want({ident("b")})
    assert published.messages[-1] == ipc.CertificatesChanged(removed=(ident("a"),))
    assert [e["identity"] for e in m.dump()] == [ident("b")]
    assert [c.identity for c in m.snapshot()] == [ident("b")]
    m.stop()


async def test_forgetting_fails_waiters_and_drops_the_inflight_result() -> None:
    source, published = FakeSource(ttl=60), Published()
    source.gate.clear()
    m = manager(source, published)
    m.want({ident("a")})
    waiter = asyncio.ensure_future(m.get(ident("a")))
    await settle()
    m.want(set())
    with pytest.raises(CertificateForgotten, match="the identity is no longer needed"):
        await waiter
    source.gate.set()
    await settle()
    assert published.messages == []  # nothing was published, so nothing to remove
    assert m.dump() == []
    m.stop()


async def test_on_demand_certificate_survives_want_until_forgotten() -> None:
    source, published = FakeSource(ttl=60), Published()
    m = manager(source, published)
    cert = await m.get(ident("lazy"))
    m.want({ident("a")})
    await until(lambda: len(m.snapshot()) == 2)
    assert await m.get(ident("lazy")) is cert  # cached: no second fetch
    assert source.fetches.count(ident("lazy")) == 1
    m.forget(ident("lazy"))
    assert published.messages[-1].removed == (ident("lazy"),)
    m.stop()


# --- priorities and concurrency --------------------------------------------------------------


async def test_priority_order_when_saturated() -> None:
    # Upstream `test_priority`: with one slot busy, queued fetches run RealTime, Warmup,
    # then Background.
    source, published = FakeSource(ttl=60), Published()
    source.gate.clear()
    m = manager(source, published, concurrency=1)
    requests = [
        (ident("id1"), Priority.BACKGROUND),
        (ident("id2"), Priority.BACKGROUND),
        (ident("id3"), Priority.WARMUP),
        (ident("id4"), Priority.REALTIME),
    ]
    waiters = []
    for identity, priority in requests:
        waiters.append(asyncio.ensure_future(m.get(identity, priority)))
        await settle()
    source.gate.set()
    await asyncio.gather(*waiters)
    assert source.fetches == [ident("id1"), ident("id4"), ident("id3"), ident("id2")]
    m.stop()


async def test_realtime_request_bumps_a_queued_prefetch() -> None:
    # Upstream `test_warmup_existing`.
    source, published = FakeSource(ttl=60), Published()
    source.gate.clear()
    m = manager(source, published, concurrency=1)
    m.want({ident(f"warmup-{i}") for i in range(1, 5)})
    await settle()
    waiter = asyncio.ensure_future(m.get(ident("warmup-4")))
    await settle()
    source.gate.set()
    await waiter
    assert source.fetches[:2] == [ident("warmup-1"), ident("warmup-4")]
    m.stop()


async def test_realtime_new_identity_overtakes_queued_prefetches() -> None:
    # Upstream `test_warmup_new`.
    source, published = FakeSource(ttl=60), Published()
    source.gate.clear()
    m = manager(source, published, concurrency=1)
    m.want({ident(f"warmup-{i}") for i in range(1, 5)})
    await settle()
    waiter = asyncio.ensure_future(m.get(ident("realtime")))
    await settle()
    source.gate.set()
    await waiter
    assert source.fetches[:2] == [ident("warmup-1"), ident("realtime")]
    m.stop()


def test_queue_orders_by_priority_then_due_and_compacts_forgotten_entries() -> None:
    q = _Queue()
    q.push("bg-late", Priority.BACKGROUND, 20.0)
    q.push("bg-early", Priority.BACKGROUND, 10.0)
    q.push("warm", Priority.WARMUP, 30.0)
    q.push("warm", Priority.BACKGROUND, 0.0)  # lower priority: no change
    q.push("bg-late", Priority.REALTIME, 25.0)  # bumped
    assert [q.pop() for _ in range(len(q))] == ["bg-late", "warm", "bg-early"]
    for i in range(1000):
        q.push(f"id{i}", Priority.BACKGROUND, 1000.0 + i)
    for i in range(999):
        q.remove(f"id{i}")
    assert len(q) == 1
    assert len(q._heap) < 100  # stale entries do not wait hours for their due time
    assert q.peek() == ("id999", 1999.0)


async def test_concurrency_is_bounded() -> None:
    source, published = FakeSource(ttl=60, latency=0.03), Published()
    m = manager(source, published, concurrency=3)
    m.want({ident(f"w{i}") for i in range(10)})
    await until(lambda: len(m.snapshot()) == 10)
    assert source.max_active == 3
    m.stop()


async def test_default_concurrency(tmp_path: Any) -> None:
    assert CertManager(FakeSource(), Published()).concurrency == CONCURRENCY == 8
    fake = FakeCASource(str(tmp_path / "ca"), ttl=60)
    assert CertManager(fake, Published()).concurrency == FAKE_CA_CONCURRENCY == 2


async def test_duplicate_requests_share_one_fetch() -> None:
    source, published = FakeSource(ttl=60), Published()
    m = manager(source, published, concurrency=1)
    certs = await asyncio.gather(*(m.get(ident("id1")) for _ in range(4)))
    assert all(c is certs[0] for c in certs)
    assert source.fetches == [ident("id1")]
    m.stop()


# --- failures of the source -------------------------------------------------------------------


async def test_first_fetch_failure_is_reported_to_waiters() -> None:
    source, published = FakeSource(ttl=60), Published()
    source.fail = CADown("signing gRPC error (UNAVAILABLE): down")
    m = manager(source, published)
    with pytest.raises(CertificateUnavailable, match="UNAVAILABLE"):
        await m.get(ident("a"))
    assert _state(m, ident("a")) == "Unavailable: signing gRPC error (UNAVAILABLE): down"
    m.stop()


async def test_unexpected_source_error_is_logged_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, published = FakeSource(ttl=60), Published()
    source.fail = RuntimeError("bug")
    m = manager(source, published)
    with caplog.at_level(logging.ERROR):
        m.want({ident("a")})
        await until(lambda: len(source.fetches) >= 3)
    assert "certificate fetch for spiffe://cluster.local/ns/test/sa/a crashed" in caplog.text
    assert _state(m, ident("a")) == "Unavailable: bug"
    m.stop()


async def test_certificate_for_another_identity_is_a_failure() -> None:
    class Liar(FakeSource):
        async def fetch(self, identity: str) -> ipc.WorkloadCertificate:
            return await super().fetch(ident("someone-else"))

    source, published = Liar(ttl=60), Published()
    m = manager(source, published)
    with pytest.raises(CertificateUnavailable, match="someone-else"):
        await m.get(ident("a"))
    assert published.messages == []
    m.stop()


async def test_stop_cancels_fetches_and_fails_waiters() -> None:
    source, published = FakeSource(ttl=60), Published()
    source.gate.clear()
    m = manager(source, published)
    waiter = asyncio.ensure_future(m.get(ident("a")))
    await settle()
    m.stop()
    with pytest.raises(CertificateUnavailable, match="stopped"):
        await waiter
    await settle()
    assert source.active == 0


# --- config_dump -----------------------------------------------------------------------------


async def test_dump_matches_upstream_shape_sorted_by_identity() -> None:
    source, published = FakeSource(ttl=None), Published()
    m = manager(source, published)
    await m.get(ident("b"))
    source.fail = CADown("CA down")
    with pytest.raises(CertificateUnavailable):
        await m.get(ident("a"))
    source.gate.clear()
    m.want({ident("a"), ident("b"), ident("c")})
    dump = m.dump()
    assert [(e["identity"], e["state"]) for e in dump] == [
        (ident("a"), "Unavailable: CA down"),
        (ident("b"), "Available"),
        (ident("c"), "Initializing"),
    ]
    assert dump[0]["certChain"] == dump[0]["rootCerts"] == []
    available = dump[1]
    assert set(available) == {"identity", "state", "certChain", "rootCerts"}
    cert = m.snapshot()[0]
    [leaf_dump] = _cert_dumps(available, "certChain")
    [root_dump] = _cert_dumps(available, "rootCerts")
    assert set(leaf_dump) == {"pem", "serialNumber", "validFrom", "expirationTime"}
    assert base64.b64decode(leaf_dump["pem"]).decode() == cert.chain_pem[0]
    assert base64.b64decode(root_dump["pem"]).decode() == cert.roots_pem[0]
    leaf = x509.load_pem_x509_certificate(cert.chain_pem[0].encode())
    assert leaf_dump["serialNumber"] == str(leaf.serial_number)
    assert RFC3339.fullmatch(leaf_dump["validFrom"])
    assert leaf_dump["expirationTime"] == time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(cert.not_after)
    )
    m.stop()


def _cert_dumps(entry: dict[str, object], key: str) -> list[dict[str, str]]:
    value = entry[key]
    assert isinstance(value, list)
    return value


# --- prefetch rules ------------------------------------------------------------------------


def _w(uid: str, node: str, protocol: str = "TCP", native_tunnel: bool = False) -> Workload:
    return Workload(
        uid=uid,
        name=uid,
        namespace="ns",
        service_account=uid,
        trust_domain="cluster.local",
        node=node,
        protocol=protocol,  # type: ignore[arg-type]
        native_tunnel=native_tunnel,
        workload_ips=(f"10.0.0.{len(uid)}",),
    )


WORKLOADS = (
    _w("hbone-local", "n1", "HBONE"),
    _w("tcp-local", "n1"),
    _w("hbone-remote", "n2", "HBONE"),
    _w("tunnel-local", "n1", native_tunnel=True),
)


def _sa(name: str, td: str = "cluster.local", ns: str = "ns") -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{name}"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NODE_NAME": "n1"}, {_sa("hbone-local"), _sa("tunnel-local")}),
        ({}, {_sa("hbone-local"), _sa("hbone-remote"), _sa("tunnel-local")}),
        ({"NODE_NAME": "n3"}, set()),
        (
            {
                "NODE_NAME": "n3",
                "POD_NAME": "ztunnel-x",
                "POD_NAMESPACE": "istio-system",
                "SERVICE_ACCOUNT": "ztunnel",
                "TRUST_DOMAIN": "td.example",
            },
            {_sa("ztunnel", "td.example", "istio-system")},
        ),
        ({"NODE_NAME": "n3", "POD_NAME": "ztunnel-x", "POD_NAMESPACE": "istio-system"}, set()),
        (
            {"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "ns/tcp-local/tcp-local"},
            {_sa("tcp-local")},
        ),
        (
            {
                "PROXY_MODE": "dedicated",
                "PROXY_WORKLOAD_INFO": "ns/missing/missing",
                "POD_NAME": "ztunnel-x",
                "POD_NAMESPACE": "istio-system",
                "SERVICE_ACCOUNT": "ztunnel",
            },
            set(),
        ),
    ],
)
def test_wanted_identities(env: dict[str, str], expected: set[str]) -> None:
    config = Config.from_env({"FAKE_CA": "true", **env}, cpu_count=1, mesh_config_path=NO_MESH)
    state = ProxyState.empty(config.node_name).apply(StateDelta(workloads=WORKLOADS))
    assert wanted_identities(state, config) == expected
