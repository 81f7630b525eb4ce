"""The worker's DNS proxy against real clients: `dig`, a fake upstream in a netns, fuzzing, load.

`workers.dns.DNSServer` runs in this process on a uvloop loop, bound to 127.0.0.1 (and ::1
when lo has IPv6) on an ephemeral port, with a fixed state. Clients are `dig` subprocesses
(UDP and TCP), raw sockets for bad packets, and `dnsperf` (or a small Python load client)
for throughput. Names it does not know go to a fake upstream resolver: a dnspython
responder inside a network namespace this module creates (`ztdns-<pid>`, a veth pair on
RFC 2544 benchmark addresses) and always deletes. Tests that need it need root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import dns.message
import pytest
import uvloop

from workers.dns import DNSServer, SocketFactory, bind_pairs, ipv6_on_localhost
from workers.metrics import WorkerMetrics
from workers.tasks import TaskSet
from ztunnel import sockets
from ztunnel.core import dns as core
from ztunnel.core.config import Config
from ztunnel.core.model import NetworkAddress, Service, StateSnapshot, Workload
from ztunnel.core.state import ProxyState

T = TypeVar("T")

pytestmark = pytest.mark.timeout(60)

DIG = shutil.which("dig")
IP = shutil.which("ip") or "/usr/sbin/ip"
NETNS = f"ztdns-{os.getpid()}"
HOST_IF, PEER_IF = f"ztdns{os.getpid()}h", f"ztdns{os.getpid()}p"
# RFC 2544 benchmarking addresses (never a real network), a /29 per test process.
_NET = f"198.19.{os.getpid() % 250}"
HOST_IP, UPSTREAM_IP, DEAD_IP = f"{_NET}.1", f"{_NET}.2", f"{_NET}.3"
LOAD_SECONDS = 3

needs_dig = pytest.mark.skipif(DIG is None, reason="dig (bind9-dnsutils) is not installed")


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not os.path.exists(IP):
        return "needs iproute2 (`ip`)"
    return None


needs_netns = pytest.mark.skipif(_netns_unavailable() is not None, reason=str(_netns_unavailable()))


# --- the mesh the server answers from ------------------------------------------------------


def _workload(name: str, ns: str, *ips: str, services: tuple[str, ...] = ()) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{ns}/{name}",
        name=name,
        namespace=ns,
        workload_ips=ips,
        service_account="default",
        canonical_name=name,
        canonical_revision="v1",
        services={s: {80: 80} for s in services},
    )


def _vip(ip: str) -> NetworkAddress:
    return NetworkAddress(network="", address=ip)


HEADLESS_KEY = "ns1/headless.ns1.svc.cluster.local"
CLIENT = _workload("client", "ns1", "10.0.0.1")
STATE = ProxyState.from_snapshot(
    StateSnapshot(
        workloads=(
            CLIENT,
            _workload("web-0", "ns1", "10.1.0.10", "fd00::10", services=(HEADLESS_KEY,)),
            _workload("web-1", "ns1", "10.1.0.11", "fd00::11", services=(HEADLESS_KEY,)),
        ),
        services=(
            Service(
                name="productpage",
                namespace="ns1",
                hostname="productpage.ns1.svc.cluster.local",
                vips=(_vip("10.96.0.9"), _vip("fd00:96::9")),
            ),
            Service(
                name="example",
                namespace="ns2",
                hostname="example.ns2.svc.cluster.local",
                vips=(_vip("10.96.0.10"),),
            ),
            Service(
                name="wild", namespace="ns1", hostname="*.wild.example", vips=(_vip("10.96.0.20"),)
            ),
            Service(name="headless", namespace="ns1", hostname="headless.ns1.svc.cluster.local"),
        ),
    )
)


def _config() -> Config:
    env = {
        "PROXY_MODE": "dedicated",
        "PROXY_WORKLOAD_INFO": "ns1/client/default",
        "XDS_ADDRESS": "",
        "FAKE_CA": "true",
    }
    return Config.from_env(
        env, cpu_count=2, mesh_config_path="/nonexistent/ztunnel/mesh", path_exists=lambda _: False
    )


# --- an in-process server on uvloop --------------------------------------------------------


def run(main: Callable[[], Awaitable[T]], limit: float) -> T:
    """Run `main()` on a fresh uvloop loop, bounded by `limit` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(limit):
            return await main()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bounded())


@dataclass
class Running:
    server: DNSServer
    metrics: WorkerMetrics
    tasks: TaskSet
    port: int
    hosts: list[str]

    def counters(self) -> dict[str, float]:
        """Counter totals by family since the last call."""
        out: dict[str, float] = {}
        for c in self.metrics.take_push().counters:
            out[c.family] = out.get(c.family, 0.0) + c.value
        return out


@contextlib.asynccontextmanager
async def dns_server(
    resolv_conf: Path,
    *,
    client: Workload | None = CLIENT,
    client_wait: float = 5.0,
    socket_factory: SocketFactory | None = None,
) -> AsyncIterator[Running]:
    metrics, tasks = WorkerMetrics(), TaskSet()
    server = DNSServer(
        _config(),
        lambda: client,
        lambda: STATE,
        metrics,
        tasks,
        resolv_conf=str(resolv_conf),
        client_wait=client_wait,
        socket_factory=socket_factory,
    )
    hosts = ["127.0.0.1", "::1"] if ipv6_on_localhost() else ["127.0.0.1"]
    await server.bind(hosts, 0)
    await server.start_serving()
    try:
        yield Running(server, metrics, tasks, server.addresses[0][1], hosts)
    finally:
        server.close()
        await tasks.cancel_all()


def resolv(tmp_path: Path, *servers: str) -> Path:
    path = tmp_path / "resolv.conf"
    # The search line must be ignored by the forwarder (and, in dedicated mode, strip names).
    lines = [f"nameserver {s}" for s in servers] + ["search corp.example", "options ndots:5"]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- dig -------------------------------------------------------------------------------------


@dataclass
class Dig:
    status: str
    flags: set[str]
    answers: list[tuple[str, str, str]]
    elapsed: float
    output: str = field(repr=False)


_STATUS = re.compile(r"status: ([A-Z]+)")
_FLAGS = re.compile(r";; flags: ([a-z ]*);")


async def dig(
    port: int,
    name: str,
    qtype: str = "A",
    *,
    tcp: bool = False,
    server: str = "127.0.0.1",
    extra: tuple[str, ...] = (),
) -> Dig:
    assert DIG is not None
    argv = [
        DIG, f"@{server}", "-p", str(port), name, qtype,
        "+tcp" if tcp else "+notcp", "+tries=1", "+timeout=9", *extra,
    ]  # fmt: skip
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    elapsed = time.monotonic() - start
    text = out.decode(errors="replace")
    status, flags = _STATUS.search(text), _FLAGS.search(text)
    assert status and flags, text
    return Dig(status[1], set(flags[1].split()), _answer_section(text), elapsed, text)


def _answer_section(text: str) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    inside = False
    for line in text.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            inside = True
        elif inside and not line.strip():
            break
        elif inside:
            name, _ttl, _cls, rtype, data = line.split(None, 4)
            out.append((name, rtype, data.strip()))
    return sorted(out, key=lambda r: (r[1] != "CNAME", r))


# --- the fake upstream in its own network namespace ----------------------------------------

RESPONDER = r"""
import socket, sys, threading
import dns.message, dns.rcode, dns.rrset

ip = sys.argv[1]
zone = {
    "test.example.com.": ["1.1.1.1"],
    "large.test.": ["240.0.%d.%d" % (i // 256, i % 256) for i in range(256)],
}
cache = {}

def answer(data, tcp):
    key = (tcp, data[2:])
    hit = cache.get(key)
    if hit is not None:
        return data[:2] + hit
    q = dns.message.from_wire(data)
    name = q.question[0].name.to_text().lower()
    if name == "blackhole.test.":
        return None
    r = dns.message.make_response(q, recursion_available=True)
    if name not in zone:
        r.set_rcode(dns.rcode.NXDOMAIN)
    elif q.question[0].rdtype == 1:
        r.answer.append(dns.rrset.from_text_list(name, 60, "IN", "A", zone[name]))
    limit = 65535 if tcp else (max(512, q.payload) if q.edns >= 0 else 512)
    wire = r.to_wire(max_size=limit, prefer_truncation=True)
    cache[key] = wire[2:]
    return wire

def serve_udp(sock):
    while True:
        data, addr = sock.recvfrom(65535)
        try:
            out = answer(data, False)
        except Exception:
            continue
        if out is not None:
            sock.sendto(out, addr)

def serve_conn(conn):
    with conn:
        while True:
            head = conn.recv(2, socket.MSG_WAITALL)
            if len(head) < 2:
                return
            data = conn.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)
            out = answer(data, True)
            if out is not None:
                conn.sendall(len(out).to_bytes(2, "big") + out)

udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((ip, 53))
tcp = socket.create_server((ip, 53))
threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
print("ready", flush=True)
while True:
    conn, _ = tcp.accept()
    threading.Thread(target=serve_conn, args=(conn,), daemon=True).start()
"""


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run([IP, *args], check=check, capture_output=True, timeout=15)


def _remove_stale() -> None:
    """Namespaces of earlier runs whose process is gone."""
    listing = subprocess.run(
        [IP, "netns", "list"], capture_output=True, text=True, timeout=15, check=False
    ).stdout
    for line in listing.splitlines():
        m = re.match(r"ztdns-(\d+)\b", line)
        if m and not Path(f"/proc/{m[1]}").exists():
            _ip("netns", "del", f"ztdns-{m[1]}", check=False)


@dataclass
class Upstream:
    ip: str
    dead_ip: str  # in the namespace, nothing listens: ICMP port unreachable
    proc: subprocess.Popen[str]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    _remove_stale()
    _ip("netns", "del", NETNS, check=False)
    proc: subprocess.Popen[str] | None = None
    try:
        _ip("netns", "add", NETNS)
        _ip("link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF)
        _ip("link", "set", PEER_IF, "netns", NETNS)
        _ip("addr", "add", f"{HOST_IP}/29", "dev", HOST_IF)
        _ip("link", "set", HOST_IF, "up")
        _ip("-n", NETNS, "addr", "add", f"{UPSTREAM_IP}/29", "dev", PEER_IF)
        _ip("-n", NETNS, "addr", "add", f"{DEAD_IP}/29", "dev", PEER_IF)
        _ip("-n", NETNS, "link", "set", PEER_IF, "up")
        _ip("-n", NETNS, "link", "set", "lo", "up")
        proc = subprocess.Popen(
            [IP, "netns", "exec", NETNS, sys.executable, "-c", RESPONDER, UPSTREAM_IP],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the responder prints once bound
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        yield Upstream(UPSTREAM_IP, DEAD_IP, proc)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
        _ip("netns", "del", NETNS, check=False)  # takes the veth pair with it
        _ip("link", "del", HOST_IF, check=False)


# --- mesh answers --------------------------------------------------------------------------

MESH_CASES = [
    # (query, type, expected answer records); dig prints owner names absolute
    ("productpage", "A", [("productpage.", "A", "10.96.0.9")]),
    ("productpage", "AAAA", [("productpage.", "AAAA", "fd00:96::9")]),
    ("productpage.ns1", "A", [("productpage.ns1.", "A", "10.96.0.9")]),
    (
        "productpage.ns1.svc.cluster.local",
        "A",
        [("productpage.ns1.svc.cluster.local.", "A", "10.96.0.9")],
    ),
    ("example.ns2.svc", "A", [("example.ns2.svc.", "A", "10.96.0.10")]),
    ("anything.wild.example", "A", [("anything.wild.example.", "A", "10.96.0.20")]),
    (
        "headless.ns1.svc.cluster.local",
        "A",
        [
            ("headless.ns1.svc.cluster.local.", "A", "10.1.0.10"),
            ("headless.ns1.svc.cluster.local.", "A", "10.1.0.11"),
        ],
    ),
    (
        "headless.ns1.svc.cluster.local",
        "AAAA",
        [
            ("headless.ns1.svc.cluster.local.", "AAAA", "fd00::10"),
            ("headless.ns1.svc.cluster.local.", "AAAA", "fd00::11"),
        ],
    ),
    # dedicated mode strips resolv.conf's search domain and answers with a CNAME
    (
        "productpage.ns1.corp.example",
        "A",
        [
            ("productpage.ns1.corp.example.", "CNAME", "productpage.ns1."),
            ("productpage.ns1.", "A", "10.96.0.9"),
        ],
    ),
]


@needs_dig
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dig_gets_mesh_answers(tmp_path: Path, tcp: bool) -> None:
    async def main() -> None:
        async with dns_server(resolv(tmp_path, DEAD_IP)) as srv:
            for host in srv.hosts:
                results = await asyncio.gather(
                    *(dig(srv.port, n, t, tcp=tcp, server=host) for n, t, _ in MESH_CASES)
                )
                for (name, _, expected), got in zip(MESH_CASES, results, strict=True):
                    assert got.status == "NOERROR", got.output
                    assert {"qr", "aa", "rd", "ra"} <= got.flags, (name, got.flags)
                    assert got.answers == expected, got.output
            assert srv.counters() == {core.REQUESTS: len(MESH_CASES) * len(srv.hosts)}

    run(main, 45)


@needs_dig
def test_dig_empty_noerror_for_a_family_the_service_lacks(tmp_path: Path) -> None:
    async def main() -> None:
        async with dns_server(resolv(tmp_path, DEAD_IP)) as srv:
            got = await dig(srv.port, "example.ns2", "AAAA")
            assert got.status == "NOERROR" and "aa" in got.flags and got.answers == []

    run(main, 20)


@needs_dig
def test_unknown_client_gets_servfail(tmp_path: Path) -> None:
    async def main() -> None:
        async with dns_server(resolv(tmp_path, DEAD_IP), client=None, client_wait=0.2) as srv:
            got = await dig(srv.port, "productpage")
            assert got.status == "SERVFAIL" and "ra" in got.flags
            assert srv.counters() == {core.REQUESTS: 1.0}

    run(main, 20)


# --- forwarding ----------------------------------------------------------------------------


@needs_dig
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.usefixtures("upstream")
@pytest.mark.netns
@needs_netns
def test_unknown_names_are_forwarded_to_the_upstream_resolver(tmp_path: Path, tcp: bool) -> None:
    async def main() -> None:
        async with dns_server(resolv(tmp_path, UPSTREAM_IP)) as srv:
            found = await dig(srv.port, "test.example.com", tcp=tcp)
            assert found.status == "NOERROR" and "aa" not in found.flags and "ra" in found.flags
            assert found.answers == [("test.example.com.", "A", "1.1.1.1")]
            missing = await dig(srv.port, "fake-blahblahblah.com", tcp=tcp)
            assert missing.status == "NXDOMAIN"
            # A mesh name with a type the mesh does not answer goes upstream too.
            mx = await dig(srv.port, "productpage.ns1.svc.cluster.local", "MX", tcp=tcp)
            assert mx.status == "NXDOMAIN" and "aa" not in mx.flags
            big = await dig(srv.port, "large.test", tcp=tcp)  # dig retries TC over TCP
            assert big.status == "NOERROR" and len(big.answers) == 256
            counts = srv.counters()
            assert counts[core.REQUESTS] == counts[core.UPSTREAM_REQUESTS] >= 4
            assert counts[core.UPSTREAM_FAILURES] == 2  # NXDOMAIN counts, as upstream's does
            assert counts[f"{core.UPSTREAM_DURATION}_count"] == counts[core.UPSTREAM_REQUESTS]

    run(main, 45)


@needs_dig
@pytest.mark.usefixtures("upstream")
@pytest.mark.netns
@needs_netns
def test_oversized_upstream_reply_is_truncated_for_udp_clients(tmp_path: Path) -> None:
    async def main() -> None:
        async with dns_server(resolv(tmp_path, UPSTREAM_IP)) as srv:
            got = await dig(srv.port, "large.test", extra=("+ignore", "+bufsize=1232"))
            assert got.status == "NOERROR" and "tc" in got.flags
            # dnspython drops whole RRsets that do not fit (RFC 2181 §9): no partial set.
            assert got.answers == []

    run(main, 20)


@needs_dig
@pytest.mark.usefixtures("upstream")
@pytest.mark.netns
@needs_netns
def test_upstream_down_is_servfail_while_mesh_names_still_resolve(tmp_path: Path) -> None:
    async def main() -> None:
        async with dns_server(resolv(tmp_path, DEAD_IP)) as srv:
            for tcp in (False, True):
                down = await dig(srv.port, "test.example.com", tcp=tcp)
                assert down.status == "SERVFAIL" and down.elapsed < 5.0
                mesh = await dig(srv.port, "productpage", tcp=tcp)
                assert mesh.status == "NOERROR" and mesh.answers
            counts = srv.counters()
            assert counts[core.UPSTREAM_FAILURES] == 2

    run(main, 30)


@needs_dig
@pytest.mark.usefixtures("upstream")
@pytest.mark.netns
@needs_netns
def test_blackholed_upstream_is_servfail_at_the_deadline_without_stalling(tmp_path: Path) -> None:
    async def main() -> None:
        async with dns_server(resolv(tmp_path, UPSTREAM_IP)) as srv:
            pending = asyncio.ensure_future(dig(srv.port, "blackhole.test"))
            await asyncio.sleep(0.5)
            mesh = await dig(srv.port, "productpage")  # answered while the other waits
            assert mesh.status == "NOERROR" and mesh.elapsed < 1.0
            down = await pending
            assert down.status == "SERVFAIL"
            assert 4.5 <= down.elapsed < 5.5 + 1.0  # the 5 s forward deadline, dig's start-up

    run(main, 30)


@needs_dig
@pytest.mark.usefixtures("upstream")
@pytest.mark.netns
@needs_netns
def test_upstream_sockets_come_from_the_socket_factory(tmp_path: Path) -> None:
    made: list[tuple[int, int]] = []

    async def factory(family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
        made.append((family, kind))  # in shared mode: created inside the pod netns
        return socket.socket(family, kind)

    async def main() -> None:
        async with dns_server(resolv(tmp_path, UPSTREAM_IP), socket_factory=factory) as srv:
            assert (await dig(srv.port, "test.example.com")).status == "NOERROR"
            assert (await dig(srv.port, "large.test", tcp=True)).status == "NOERROR"
        assert made == [
            (socket.AF_INET, socket.SOCK_DGRAM),
            (socket.AF_INET, socket.SOCK_DGRAM),
            (socket.AF_INET, socket.SOCK_STREAM),  # the truncated UDP reply's TCP retry
        ]

    run(main, 20)


def _udp_held_port() -> tuple[socket.socket, int]:
    """A UDP socket on a port whose TCP twin is free.

    Below the ephemeral range (32768+), so that no outgoing TCP connection of a concurrent
    test can take the TCP port between this check and the test's own bind.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(27000, 32000)
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            holder.bind(("127.0.0.1", port))
            sockets.probe_port_free("127.0.0.1", port)
        except OSError:
            holder.close()
            continue
        return holder, port
    raise AssertionError("no port with UDP and TCP both free in 27000-31999")


def test_bind_failure_raises_and_leaves_nothing_bound() -> None:
    holder, port = _udp_held_port()
    with holder, pytest.raises(sockets.BindError, match="udp"):
        bind_pairs(["127.0.0.1"], port)
    sockets.probe_port_free("127.0.0.1", port)  # the TCP half was released


# --- bad packets -----------------------------------------------------------------------------


def _garbage(rng: random.Random, valid: bytes) -> bytes:
    """Random bytes, or a valid query with a few bytes changed, cut or extended."""
    if rng.random() < 0.5:
        return rng.randbytes(rng.randrange(0, 600))
    wire = bytearray(valid)
    for _ in range(rng.randrange(1, 6)):
        wire[rng.randrange(len(wire))] = rng.randrange(256)
    return bytes(wire[: rng.randrange(len(wire) + 1)]) + rng.randbytes(rng.randrange(0, 20))


@needs_dig
def test_server_still_answers_after_a_fuzz_pass(tmp_path: Path) -> None:
    rng = random.Random(53)
    q = dns.message.make_query("productpage.ns1.svc.cluster.local.", "A", use_edns=0)
    valid = q.to_wire()

    async def main() -> None:
        async with dns_server(resolv(tmp_path, DEAD_IP)) as srv:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            with sock:
                for i in range(3000):
                    sock.sendto(_garbage(rng, valid), ("127.0.0.1", srv.port))
                    if i % 100 == 0:
                        await asyncio.sleep(0.01)  # let the server read; UDP drops are fine
                await asyncio.sleep(0.2)
            for _ in range(50):  # TCP: bad prefixes, truncated frames, junk frames
                _r, w = await asyncio.open_connection("127.0.0.1", srv.port)
                body = _garbage(rng, valid)
                prefix = rng.choice([len(body), len(body) + 7, 0, 65535, rng.randrange(65536)])
                w.write(prefix.to_bytes(2, "big") + body)
                w.close()
            for tcp in (False, True):
                got = await dig(srv.port, "productpage", tcp=tcp)
                assert got.status == "NOERROR" and got.answers, got.output

    run(main, 45)


def test_tcp_connection_without_a_complete_request_is_closed_after_the_timeout(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with dns_server(resolv(tmp_path, DEAD_IP)) as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(b"\x00\x40partial")  # promises 64 bytes, sends 7
            start = time.monotonic()
            assert await reader.read() == b""  # closed by the server
            assert 4.0 <= time.monotonic() - start < 7.0
            writer.close()

    run(main, 20)


def test_tcp_pipelined_queries_are_all_answered(tmp_path: Path) -> None:
    names = [f"n{i}.wild.example." for i in range(100)]

    async def main() -> None:
        async with dns_server(resolv(tmp_path, DEAD_IP)) as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            for i, name in enumerate(names):
                wire = dns.message.make_query(name, "A", id=i).to_wire()
                writer.write(len(wire).to_bytes(2, "big") + wire)
            writer.write_eof()  # half-close: the answers still come
            got = {}
            for _ in names:
                size = int.from_bytes(await reader.readexactly(2), "big")
                msg = dns.message.from_wire(await reader.readexactly(size))
                got[msg.id] = msg.answer[0][0].to_text()
            assert got == dict.fromkeys(range(100), "10.96.0.20")
            assert await reader.read() == b""
            writer.close()

    run(main, 20)


# --- throughput (printed, never asserted) ---------------------------------------------------

LOAD_CLIENT = r"""
import socket, sys, time, dns.message
host, port, name, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
window = 32
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((host, port))
sock.settimeout(0.5)
wires = [dns.message.make_query(name, "A", id=i).to_wire() for i in range(65536)]
sent = done = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    while sent - done < window:
        sock.send(wires[sent % 65536]); sent += 1
    try:
        sock.recv(65535); done += 1
    except socket.timeout:
        done = sent  # lost: refill the window
print(done / seconds)
"""


async def _qps(host: str, port: int, name: str, tmp_path: Path) -> tuple[float, str]:
    """Queries per second for `name`; `{i}` in it makes 20,000 distinct names (dnsperf)."""
    dnsperf = shutil.which("dnsperf")
    if dnsperf is not None:
        data = tmp_path / "queries.txt"
        count = 20_000 if "{i}" in name else 1
        data.write_text("".join(f"{name.format(i=i)} A\n" for i in range(count)))
        argv = [dnsperf, "-s", host, "-p", str(port), "-d", str(data), "-l", str(LOAD_SECONDS)]
        argv += ["-c", "4", "-q", "64"]
        tool = "dnsperf"
    else:
        argv = [sys.executable, "-c", LOAD_CLIENT, host, str(port), name.format(i=0)]
        argv.append(str(LOAD_SECONDS))
        tool = "python client"
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    m = re.search(r"Queries per second:\s+([\d.]+)", text) or re.search(r"^([\d.]+)$", text, re.M)
    assert m, text
    return float(m[1]), tool


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("upstream")
@pytest.mark.netns
@needs_netns
def test_throughput(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> list[str]:
        lines = []
        async with dns_server(resolv(tmp_path, UPSTREAM_IP)) as srv:
            for label, name in [
                ("mesh answer (one worker)", "productpage.ns1.svc.cluster.local"),
                ("mesh answer, headless 2 IPs", "headless.ns1.svc.cluster.local"),
                ("mesh answer, distinct names (uncached)", "n{i}.wild.example"),
                ("forwarded (one worker)", "test.example.com"),
            ]:
                qps, tool = await _qps("127.0.0.1", srv.port, name, tmp_path)
                lines.append(f"dns qps {label}: {qps:,.0f} ({tool})")
            qps, tool = await _qps(UPSTREAM_IP, 53, "test.example.com", tmp_path)
            lines.append(f"dns qps fake upstream queried directly: {qps:,.0f} ({tool})")
        return lines

    lines = run(main, 100)
    with capsys.disabled():
        print("\n" + "\n".join(lines))
