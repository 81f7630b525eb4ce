"""Socket helpers for supervisor and workers: listeners, original destination, options."""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import struct

from ztunnel.core.config import Config

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SO_MARK = getattr(socket, "SO_MARK", 36)
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
LISTEN_BACKLOG = 1024


class BindError(OSError):
    """A listener could not be bound; fatal at start."""


def bind_listener(
    host: str, port: int, *, reuse_port: bool = True, mark: int | None = None
) -> socket.socket:
    """A non-blocking TCP listener; `::` listens dual-stack."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        what = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise BindError(e.errno, f"failed to bind {format_addr(host, port)}: {what}") from e
    return sock


TCP_MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def enable_listener_migration(path: str = TCP_MIGRATE_REQ) -> tuple[bool, str | None]:
    """Set net.ipv4.tcp_migrate_req=1 in the calling thread's netns: (changed, why not).

    Our workers share each listening port with SO_REUSEPORT. When one of them dies, the
    kernel resets the connections waiting in its accept queue unless this sysctl is on, in
    which case it moves them to another listener of the group (Linux >= 5.14). The setting
    belongs to the network namespace (`/proc/sys/net` follows the opening thread's netns),
    so it is applied wherever we listen: our own netns and each pod's.
    """
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return False, None
        with open(path, "w") as f:
            f.write("1")
    except OSError as e:
        return False, e.strerror or str(e)
    return True, None


def probe_port_free(host: str, port: int) -> None:
    """Raise BindError if some other socket holds host:port.

    Binding *without* SO_REUSEPORT fails even against another SO_REUSEPORT group of the
    same user, so a second ztunnel (or anything else) on our ports is a clear start error
    instead of silently sharing the kernel's load balancing with it.
    """
    bind_listener(host, port, reuse_port=False).close()


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """SO_ORIGINAL_DST (v4), then IP6T_SO_ORIGINAL_DST, else the local address (§11.2)."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!H4s", raw, 2)
        return str(ipaddress.IPv4Address(packed)), port
    except OSError:
        pass
    try:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return canonical_ip(str(ipaddress.IPv6Address(raw[8:24]))), port
    except OSError:
        pass
    host, port = sock.getsockname()[:2]
    return canonical_ip(host), port


def canonical_ip(ip: str) -> str:
    """v4-mapped IPv6 becomes plain IPv4 (`socket::to_canonical`).

    Called for every accepted connection with what the kernel reports: a dotted quad is
    already canonical (building an `ipaddress` object for it was 2% of a new connection's
    CPU), and the few IPv6 spellings seen are cached.
    """
    if ":" not in ip:
        return ip
    return _canonical_v6(ip)


@functools.lru_cache(maxsize=4096)
def _canonical_v6(ip: str) -> str:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def format_addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def set_upstream_options(sock: socket.socket, config: Config) -> None:
    """Options on every outgoing proxy socket (§16): nodelay, keepalive, user timeout, mark."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_keepalive(sock, config)
    if config.packet_mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, config.packet_mark)


def set_keepalive(sock: socket.socket, config: Config) -> None:
    if not config.keepalive_enabled:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(config.keepalive_time)))
    sock.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(config.keepalive_interval))
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, config.keepalive_retries)
    if config.user_timeout_enabled:
        total = config.keepalive_time + config.keepalive_retries * config.keepalive_interval
        sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(total * 1000))


def new_upstream_socket(ip: str, config: Config) -> socket.socket:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        set_upstream_options(sock, config)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
