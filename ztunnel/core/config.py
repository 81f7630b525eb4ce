"""Configuration from the environment: upstream's `src/config.rs` as one frozen `Config`.

`Config.from_env(env, cpu_count=...)` is a pure function of its arguments plus one explicit
file read (the mesh config file) and existence checks through `path_exists`. Parsing follows
Rust's `FromStr` so a value upstream rejects is rejected here with the same
`invalid env var K=V (why)` message (spec §1). Durations are float seconds throughout.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import yaml

from ztunnel.core.errors import ConfigError, InvalidEnvVar

_T = TypeVar("_T")
_V = TypeVar("_V")

ProxyMode = Literal["shared", "dedicated"]
LogFormat = Literal["plain", "json"]

DEFAULT_ROOT_CERT = "./var/run/secrets/istio/root-cert.pem"  # relative, as upstream
DEFAULT_TOKEN_PATH = "./var/run/secrets/tokens/istio-token"  # relative, as upstream
DEFAULT_MESH_CONFIG_PATH = "./etc/istio/config/mesh"  # relative, as upstream
DEFAULT_INPOD_MARK = 1337  # SO_MARK default in shared (in-pod) mode
DEFAULT_DNS_PORT = 15053
DEFAULT_TERMINATION_DEADLINE = 5.0  # seconds
_ISTIOD_IN_CLUSTER = "https://istiod.istio-system.svc:15012"
_ISTIOD_LOCAL = "https://localhost:15012"
_META_PREFIX = "ISTIO_META_"
_METAJSON_PREFIX = "ISTIO_METAJSON_"
_DURATION = {"unit": "duration"}  # field metadata: to_dump writes {"secs", "nanos"}


# --- value types ---------------------------------------------------------------------------


class FrozenMap(Mapping[str, _V]):
    """A read-only str-keyed mapping that, unlike MappingProxyType, pickles (spawned workers)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, _V] | None = None) -> None:
        self._data: dict[str, _V] = dict(data or {})

    def __getitem__(self, key: str) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """Who a dedicated proxy (or ztunnel itself) runs as: upstream `state::WorkloadInfo`."""

    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class RootCert:
    """Trust roots for the xDS / CA connection: a file, the system store, or inline PEM."""

    kind: Literal["file", "system", "static"]
    value: str  # the path for "file", "SYSTEM" for "system", the PEM text for "static"


@dataclass(frozen=True, slots=True)
class AuthSource:
    """The bearer token sent to istiod: none, a file re-read per call, or a static value."""

    kind: Literal["none", "file", "static"]
    value: str = field(repr=False)  # a path, or the token itself: keep it out of reprs


@dataclass(frozen=True, slots=True)
class ProxyAddr:
    """A listener address; host None means localhost on IPv4 and (when usable) IPv6."""

    host: str | None
    port: int


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One catalogued environment variable, for generated docs."""

    name: str
    type: str
    default: str
    meaning: str


# --- Rust-compatible scalar parsers (each raises ValueError with Rust's message) -------------

_UINT = re.compile(r"\+?[0-9]+")
_FLOAT = re.compile(
    r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE
)


def parse_bool(text: str) -> bool:
    """`bool::from_str`: exactly `true` or `false`."""
    if text == "true":
        return True
    if text == "false":
        return False
    raise ValueError("provided string was not `true` or `false`")


def parse_uint(text: str, bits: int) -> int:
    """`u16/u32/u64::from_str`: ASCII digits with an optional `+`, range-checked."""
    if not text:
        raise ValueError("cannot parse integer from empty string")
    if not _UINT.fullmatch(text):
        raise ValueError("invalid digit found in string")
    value = int(text)
    if value >= 1 << bits:
        raise ValueError("number too large to fit in target type")
    return value


def parse_float(text: str) -> float:
    """`f64::from_str`: no whitespace or underscores, unlike Python's float()."""
    if not _FLOAT.fullmatch(text):
        raise ValueError("invalid float literal")
    return float(text)


_SEC = 10**9
_UNIT_NANOS: dict[str, int] = {
    alias.lower(): nanos
    for aliases, nanos in (
        (("y", "year", "years"), 365 * 86400 * _SEC),
        (("mon", "month", "months"), 30 * 86400 * _SEC),
        (("w", "week", "weeks"), 7 * 86400 * _SEC),
        (("d", "day", "days"), 86400 * _SEC),
        (("h", "hr", "hour", "hours"), 3600 * _SEC),
        (("m", "min", "minute", "minutes"), 60 * _SEC),
        (("", "s", "sec", "second", "seconds"), _SEC),
        (("ms", "msec", "millisecond", "milliseconds"), 10**6),
        (
            (
                "\u00b5s",
                "\u00b5sec",
                "\u00b5second",
                "us",
                "usec",
                "usecond",
                "microsecond",
                "microseconds",
            ),
            1000,
        ),
        (("ns", "nsec", "nanosecond", "nanoseconds"), 1),
    )
    for alias in aliases
}
# One term of a duration_str expression: optional operator, digits, optional unit (seconds).
_TERM = re.compile(r"[ \t\r\n]*([+*]?)[ \t\r\n]*([0-9]+)[ \t\r\n]*([A-Za-z\u00b5]*)[ \t\r\n]*")
_U64_MAX = (1 << 64) - 1


def _duration_terms(text: str) -> list[tuple[str, int]]:
    terms: list[tuple[str, int]] = []
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if m is None or (not terms and m[1]):
            raise ValueError(f"invalid duration {text!r}")
        op, digits, unit = m.groups()
        pos = m.end()
        # A bare number must end the input or be followed by an operator (duration_str quirk:
        # "1s 2" is 3s but "1 2" is an error).
        if not unit and pos < len(text) and text[pos] not in "+*":
            raise ValueError(f"invalid duration {text!r}")
        nanos = _UNIT_NANOS.get(unit.lower())
        if nanos is None:
            raise ValueError(f"unknown duration unit {unit!r}")
        terms.append((op or "+", int(digits) * nanos))
    if not terms:
        raise ValueError("Empty input")
    return terms


def parse_duration(text: str) -> float:
    """duration_str 0.21 (upstream's parser): `5s`, `1h30m`, `1h 30m`, `3m+31`, `1m*10`, bare = s.

    Terms are added (`+` or juxtaposition) or multiplied (`*`, every term as seconds); mixing
    both is an error, as are fractions, signs and results beyond u64 nanoseconds.
    """
    terms = _duration_terms(text)
    ops = {op for op, _ in terms[1:]}
    if len(ops) > 1:
        raise ValueError("not support '+' with '*' calculate")
    if ops == {"*"}:
        product = Fraction(1)
        for _, nanos in terms:
            product *= Fraction(nanos, _SEC)
        total = math.floor(product * _SEC)
    else:
        total = sum(nanos for _, nanos in terms)
    if total > _U64_MAX:
        raise ValueError("overflow")
    return total / _SEC


def parse_cpu_quantity(text: str) -> int:
    """A Kubernetes CPU quantity (`2`, `1.5`, `500m`) rounded up to whole CPUs; must be > 0."""
    millis = text.endswith("m")
    cores = parse_float(text[:-1] if millis else text) / (1000 if millis else 1)
    if not math.isfinite(cores) or cores <= 0:
        raise ValueError("must be a positive CPU quantity")
    return math.ceil(cores)


# --- typed reads of one environment --------------------------------------------------------


class _Env:
    """Reads of one environment mapping that fail the way upstream's `parse` does."""

    __slots__ = ("_env",)

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, key: str) -> str | None:
        return self._env.get(key)

    def text_or(self, key: str, default: str) -> str:
        """Set-but-empty stays empty, as upstream's `parse_default` keeps it."""
        value = self._env.get(key)
        return default if value is None else value

    def parsed(self, key: str, parse: Callable[[str], _T]) -> _T | None:
        raw = self._env.get(key)
        if raw is None:
            return None
        try:
            return parse(raw)
        except ValueError as err:
            raise InvalidEnvVar(key, raw, str(err)) from err

    def flag(self, key: str, default: bool) -> bool:
        value = self.parsed(key, parse_bool)
        return default if value is None else value

    def uint(self, key: str, bits: int, default: int) -> int:
        value = self.parsed(key, lambda s: parse_uint(s, bits))
        return default if value is None else value

    def duration(self, key: str, default: float) -> float:
        value = self.parsed(key, parse_duration)
        return default if value is None else value

    def port(self, key: str, default: int) -> int:
        return self.parsed(key, _parse_port) or default

    def prefixed(self, prefix: str) -> list[tuple[str, str]]:
        """Every variable starting with `prefix`, sorted by name so results are deterministic."""
        return sorted((k, self._env[k]) for k in self._env if k.startswith(prefix))


def _parse_port(text: str) -> int:
    port = parse_uint(text, 16)
    if port == 0:
        raise ValueError("port must be between 1 and 65535")
    return port


# --- ProxyConfig: mesh file `defaultConfig` overlaid by PROXY_CONFIG (spec §1.3) ------------


@dataclass(frozen=True, slots=True)
class _ProxyConfig:
    discovery_address: str | None = None
    proxy_admin_port: int | None = None
    stats_port: int | None = None
    concurrency: int | None = None
    proxy_metadata: tuple[tuple[str, str], ...] = ()

    def merge(self, over: _ProxyConfig) -> _ProxyConfig:
        """Field by field, `over` wins; metadata maps are merged (upstream `ProxyConfig::merge`)."""
        return _ProxyConfig(
            discovery_address=_first(over.discovery_address, self.discovery_address),
            proxy_admin_port=_first(over.proxy_admin_port, self.proxy_admin_port),
            stats_port=_first(over.stats_port, self.stats_port),
            concurrency=_first(over.concurrency, self.concurrency),
            proxy_metadata=self.proxy_metadata + over.proxy_metadata,
        )


def _first(a: _T | None, b: _T | None) -> _T | None:
    return b if a is None else a


def _yaml_port(doc: Mapping[str, object], key: str, low: int) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 0xFFFF:
        raise ValueError(f"{key} must be an integer between {low} and 65535, got {value!r}")
    return value


def _yaml_metadata(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("proxyMetadata must map strings to strings")
    return tuple(value.items())


def _proxy_config_from(doc: object) -> _ProxyConfig:
    """A ProxyConfig document (YAML or JSON, already loaded); unknown fields are ignored."""
    if doc is None:
        return _ProxyConfig()
    if not isinstance(doc, dict):
        raise ValueError("expected a mapping")
    address = doc.get("discoveryAddress")
    if address is not None and not isinstance(address, str):
        raise ValueError(f"discoveryAddress must be a string, got {address!r}")
    return _ProxyConfig(
        discovery_address=address,
        proxy_admin_port=_yaml_port(doc, "proxyAdminPort", 1),
        stats_port=_yaml_port(doc, "statsPort", 1),
        concurrency=_yaml_port(doc, "concurrency", 0),
        proxy_metadata=_yaml_metadata(doc.get("proxyMetadata")),
    )


def _read_mesh_config(path: str) -> _ProxyConfig:
    """The mesh config file's `defaultConfig`; a missing file is an empty config."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        if doc is not None and not isinstance(doc, dict):
            raise ValueError("expected a mapping")
        return _proxy_config_from(doc.get("defaultConfig") if doc else None)
    except FileNotFoundError:
        return _ProxyConfig()
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"failed parsing mesh config file {path}: {err}") from err


def _load_proxy_config(text: str) -> _ProxyConfig:
    try:
        return _proxy_config_from(yaml.safe_load(text))
    except yaml.YAMLError as err:
        raise ValueError(f"failed parsing proxy config: {err}") from err


def _proxy_config(e: _Env, mesh_config_path: str) -> _ProxyConfig:
    mesh = _read_mesh_config(mesh_config_path)
    if not e.text("PROXY_CONFIG"):  # empty means unset, as upstream
        return mesh
    return mesh.merge(e.parsed("PROXY_CONFIG", _load_proxy_config) or _ProxyConfig())


def _proxy_metadata(e: _Env, pc: _ProxyConfig) -> FrozenMap[str]:
    """ProxyConfig metadata with `ISTIO_META_` stripped, then ISTIO_META_* env on top."""
    meta = {k.removeprefix(_META_PREFIX): v for k, v in pc.proxy_metadata}
    meta.update((k.removeprefix(_META_PREFIX), v) for k, v in e.prefixed(_META_PREFIX))
    return FrozenMap(meta)


def _metajson(e: _Env) -> tuple[FrozenMap[object], tuple[str, ...]]:
    """ISTIO_METAJSON_<K> values as JSON; an unparseable one is skipped with a warning."""
    values: dict[str, object] = {}
    warnings: list[str] = []
    for key, raw in e.prefixed(_METAJSON_PREFIX):
        try:
            values[key.removeprefix(_METAJSON_PREFIX)] = json.loads(raw)
        except (ValueError, RecursionError):
            warnings.append(f"failed to parse {key}={raw}")
    return FrozenMap(values), tuple(warnings)


# --- addresses, trust and identity ---------------------------------------------------------

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def normalize_uri(value: str) -> str:
    """Upstream `validate_uri`: reject what hyper's Uri rejects; add `https://` if scheme-less."""
    if not value.isascii() or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("invalid uri character")
    has_scheme = _SCHEME.match(value) is not None
    if not has_scheme and any(c in value for c in "/?#"):
        raise ValueError("invalid format")  # scheme-less must be a bare authority
    uri = value if has_scheme else f"https://{value}"
    parts = urlsplit(uri)
    if not parts.hostname:
        raise ValueError("empty authority")
    _ = parts.port  # raises ValueError on a bad port
    return uri


def _xds_address(e: _Env, pc: _ProxyConfig, istiod: str) -> str | None:
    """XDS_ADDRESS, else mesh `discoveryAddress`, else istiod; empty means no xDS at all."""
    if e.text("XDS_ADDRESS") is not None:
        return e.parsed("XDS_ADDRESS", lambda s: normalize_uri(s) if s else None)
    if pc.discovery_address is None:
        return istiod
    if not pc.discovery_address:
        return None
    try:
        return normalize_uri(pc.discovery_address)
    except ValueError as err:
        raise ConfigError(f"invalid uri: {pc.discovery_address} ({err})") from err


def _ca_address(e: _Env, fake_ca: bool, istiod: str) -> str | None:
    """CA_ADDRESS, else istiod (not the mesh discoveryAddress, as upstream); None with FAKE_CA."""
    if fake_ca:
        return None
    if e.text("CA_ADDRESS") is None:
        return istiod
    return e.parsed("CA_ADDRESS", lambda s: normalize_uri(s) if s else None)


def _root_cert(e: _Env, key: str, path_exists: Callable[[str], bool]) -> RootCert:
    """An existing path is a file; `SYSTEM` is the OS store; anything else is inline PEM.

    Quirk kept from upstream: when the default path is absent, the path text itself becomes
    "static PEM", which only fails when a TLS connection is attempted.
    """
    value = e.text(key)
    value = DEFAULT_ROOT_CERT if value is None else value
    if path_exists(value):
        return RootCert(kind="file", value=value)
    if value == "SYSTEM":
        return RootCert(kind="system", value=value)
    return RootCert(kind="static", value=value)


def _auth_source(e: _Env, path_exists: Callable[[str], bool]) -> AuthSource:
    raw = e.text("AUTH_TOKEN")
    if raw is None:
        if path_exists(DEFAULT_TOKEN_PATH):
            return AuthSource(kind="file", value=DEFAULT_TOKEN_PATH)
        return AuthSource(kind="none", value="")
    return AuthSource(kind="file" if path_exists(raw) else "static", value=raw)


def _parse_proxy_mode(text: str) -> ProxyMode:
    if text == "shared":
        return "shared"
    if text == "dedicated":
        return "dedicated"
    raise ValueError("PROXY_MODE must be one of dedicated, shared")


def _parse_workload_info(text: str) -> WorkloadInfo:
    """`namespace/name/service-account`: exactly three non-empty parts.

    Stricter than upstream's `splitn(3, "/")`, which would take `a/b/c/d` as service account
    `c/d`, a name Kubernetes cannot have.
    """
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError("must match the format 'namespace/name/service-account'")
    namespace, name, service_account = parts
    return WorkloadInfo(name=name, namespace=namespace, service_account=service_account)


def _workload_info(e: _Env, mode: ProxyMode) -> WorkloadInfo | None:
    if mode == "shared":
        return None  # upstream ignores PROXY_WORKLOAD_INFO in shared mode
    info = e.parsed("PROXY_WORKLOAD_INFO", _parse_workload_info)
    if info is None:
        raise ConfigError("PROXY_WORKLOAD_INFO is required in dedicated mode")
    return info


def _cluster_id(e: _Env) -> str:
    meta = e.text("ISTIO_META_CLUSTER_ID")
    return e.text_or("CLUSTER_ID", "Kubernetes") if meta is None else meta


def _termination_deadline(e: _Env) -> float:
    """CONNECTION_TERMINATION_DEADLINE, else TERMINATION_GRACE_PERIOD_SECONDS less a margin.

    The margin leaves time to close connections cleanly before Kubernetes sends SIGKILL.
    Upstream computes `secs - 1` in u64, which underflows at 0; here 0 gives the 1 s floor.
    """
    explicit = e.parsed("CONNECTION_TERMINATION_DEADLINE", parse_duration)
    grace = e.parsed("TERMINATION_GRACE_PERIOD_SECONDS", lambda s: parse_uint(s, 64))
    if explicit is not None:
        return explicit
    if grace is None:
        return DEFAULT_TERMINATION_DEADLINE
    return float(max(grace - 5 if grace > 10 else grace - 1, 1))


# --- headers and DNS -----------------------------------------------------------------------

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")


def _headers(e: _Env, prefix: str) -> tuple[tuple[str, str], ...]:
    """`<prefix><K>=v` becomes gRPC metadata `k: v`; names lowercased as tonic/grpc require."""
    out: list[tuple[str, str]] = []
    for key, value in e.prefixed(prefix):
        name = key.removeprefix(prefix).lower()
        if not _HEADER_NAME.fullmatch(name) or name.endswith("-bin"):
            raise InvalidEnvVar(key, value, "invalid header name")
        if not all(c == "\t" or " " <= c <= "~" for c in value):
            raise InvalidEnvVar(key, value, "invalid header value")
        out.append((name, value))
    return tuple(out)


def _parse_socket_addr(text: str) -> ProxyAddr:
    """`localhost:<port>` (dual-stack localhost) or Rust `SocketAddr` syntax (`ip:port`)."""
    if text.startswith("localhost:"):
        return ProxyAddr(host=None, port=parse_uint(text.removeprefix("localhost:"), 16))
    host, _, port = text.rpartition(":")
    try:
        if host.startswith("[") and host.endswith("]"):
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host[1:-1])
        else:
            ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError("invalid socket address syntax") from None
    if not port.isascii() or not port.isdigit() or int(port) > 0xFFFF:
        raise ValueError("invalid socket address syntax")
    return ProxyAddr(host=str(ip), port=int(port))


def _dns_proxy_addr(meta: Mapping[str, str]) -> ProxyAddr:
    raw = meta.get("DNS_PROXY_ADDR")
    if raw is None:
        return ProxyAddr(host=None, port=DEFAULT_DNS_PORT)
    try:
        return _parse_socket_addr(raw)
    except ValueError as err:
        raise ConfigError(f"failed to parse DNS_PROXY_ADDR: {raw} ({err})") from err


# --- logging -------------------------------------------------------------------------------

_LEVELS = frozenset({"off", "error", "warn", "info", "debug", "trace"})


def parse_log_spec(text: str) -> str:
    """Validate `level` / `target=level` clauses (RUST_LOG syntax); returns the text unchanged."""
    for clause in text.split(","):
        target, sep, level = clause.strip().rpartition("=")
        if sep and not target:
            raise ValueError(f"missing target in {clause.strip()!r}")
        if (sep or level) and level.lower() not in _LEVELS:
            raise ValueError(f"unknown log level {level!r}")
    return text


def _log_level(e: _Env) -> str:
    """Our LOG_LEVEL, else upstream's RUST_LOG, else `info`; an empty value counts as unset."""
    for key in ("LOG_LEVEL", "RUST_LOG"):
        if e.text(key):
            return e.parsed(key, parse_log_spec) or "info"
    return "info"


# --- worker processes (spec §1.4) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CPUs:
    count: int  # what "all cores" means: the resource limit, ZTUNNEL_CPU_LIMIT or the host
    label: str  # e.g. "8 cpus (ZTUNNEL_CPU_LIMIT)"
    limit: int | None  # ceil(ZTUNNEL_RESOURCE_CPU_LIMIT)
    request: int  # ceil(ZTUNNEL_RESOURCE_CPU_REQUEST), 0 when unset


def _cpus(e: _Env, cpu_count: int) -> _CPUs:
    """Upstream `get_cpu_count`; every variable is validated even when a later one is unused."""
    limit = e.parsed("ZTUNNEL_RESOURCE_CPU_LIMIT", parse_cpu_quantity)
    request = e.parsed("ZTUNNEL_RESOURCE_CPU_REQUEST", parse_cpu_quantity) or 0
    override = e.parsed("ZTUNNEL_CPU_LIMIT", lambda s: parse_uint(s, 64))
    if limit is not None:
        count, origin = limit, "ZTUNNEL_RESOURCE_CPU_LIMIT"
    elif override is not None:
        count, origin = override, "ZTUNNEL_CPU_LIMIT"
    else:
        count, origin = cpu_count, "logical"
    return _CPUs(count=count, label=f"{count} cpus ({origin})", limit=limit, request=request)


def _default_workers(cpus: _CPUs, concurrency: int | None) -> tuple[int, str]:
    """ProxyConfig `concurrency`, else upstream `default_worker_threads`."""
    if concurrency:
        return concurrency, f"proxy config concurrency={concurrency}"
    if concurrency == 0:
        return cpus.count, f"proxy config concurrency=0 (all {cpus.label})"
    if cpus.limit is not None:
        n = max(cpus.limit, cpus.request)
        return n, f"max(ZTUNNEL_RESOURCE_CPU_LIMIT={cpus.limit}, request={cpus.request})"
    fraction = math.ceil(cpus.count * 0.25)
    n = max(fraction, cpus.request, 2)
    return n, f"default max(ceil(cpus*0.25)={fraction}, request={cpus.request}, 2) of {cpus.label}"


def _parse_worker_threads(text: str, cpus: _CPUs) -> tuple[int, str]:
    """ZTUNNEL_WORKER_THREADS: `N`, `0` (= all cpus) or `P%` with 0 < P <= 100."""
    if text.endswith("%"):
        try:
            percent = parse_float(text[:-1])
        except ValueError as err:
            raise ValueError(f"invalid percentage: {err}") from err
        if not 0 < percent <= 100:  # also rejects NaN, which upstream lets through
            raise ValueError("percentage must be between 0 and 100")
        n = max(math.ceil(cpus.count * percent / 100), 1)
        return n, f"ZTUNNEL_WORKER_THREADS={text} of {cpus.label}"
    try:
        n = parse_uint(text, 64)
    except ValueError as err:
        raise ValueError(f"invalid number: {err}") from err
    if n == 0:
        return cpus.count, f"ZTUNNEL_WORKER_THREADS=0 (all {cpus.label})"
    return n, f"ZTUNNEL_WORKER_THREADS={n}"


def _parse_positive(text: str) -> int:
    n = parse_uint(text, 64)
    if n == 0:
        raise ValueError("must be a positive integer")
    return n


def _workers(e: _Env, concurrency: int | None, cpu_count: int) -> tuple[int, str]:
    """Worker process count and a one-line explanation; our ZTUNNEL_WORKERS wins."""
    cpus = _cpus(e, cpu_count)
    n, source = _default_workers(cpus, concurrency)
    threads = e.parsed("ZTUNNEL_WORKER_THREADS", lambda s: _parse_worker_threads(s, cpus))
    explicit = e.parsed("ZTUNNEL_WORKERS", _parse_positive)
    if explicit is not None:
        return explicit, f"ZTUNNEL_WORKERS={explicit}"
    if threads is not None:
        n, source = threads
    return max(n, 1), source


# --- the configuration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything ztunnel reads from its environment, parsed once at start (STYLE §6)."""

    # mode and identity
    proxy_mode: ProxyMode  # PROXY_MODE; upstream default "shared"
    workload_info: WorkloadInfo | None  # PROXY_WORKLOAD_INFO; required in dedicated mode
    enable_proxy: bool  # ENABLE_PROXY; upstream default true
    cluster_id: str  # ISTIO_META_CLUSTER_ID, else CLUSTER_ID; upstream default "Kubernetes"
    cluster_domain: str  # CLUSTER_DOMAIN; upstream default "cluster.local"
    network: str  # NETWORK; upstream default ""
    node_name: str | None  # NODE_NAME; upstream default unset
    pod_name: str | None  # POD_NAME; upstream default unset
    pod_namespace: str | None  # POD_NAMESPACE; upstream default unset
    service_account: str | None  # SERVICE_ACCOUNT; upstream default unset
    instance_ip: str | None  # INSTANCE_IP (xDS node id); upstream default unset
    trust_domain: str  # TRUST_DOMAIN; upstream default "cluster.local"

    # control plane
    fake_ca: bool  # FAKE_CA; upstream default false
    fake_ca_dir: str  # FAKE_CA_DIR (ours); default /tmp/ztunnel-fake-ca
    xds_address: str | None  # URL; XDS_ADDRESS / mesh discoveryAddress / istiod; None = no xDS
    ca_address: str | None  # URL; CA_ADDRESS / istiod; None with FAKE_CA or empty
    xds_root_ca: RootCert  # XDS_ROOT_CA; upstream default ./var/run/secrets/istio/root-cert.pem
    ca_root_ca: RootCert  # CA_ROOT_CA; same default
    alt_xds_hostname: str | None  # ALT_XDS_HOSTNAME; upstream default unset
    alt_ca_hostname: str | None  # ALT_CA_HOSTNAME; upstream default unset
    auth_token: AuthSource  # AUTH_TOKEN; default ./var/run/secrets/tokens/istio-token if present
    xds_headers: tuple[tuple[str, str], ...]  # XDS_HEADER_<K>; lowercased gRPC metadata
    ca_headers: tuple[tuple[str, str], ...]  # CA_HEADER_<K>; lowercased gRPC metadata
    local_xds_path: str | None  # LOCAL_XDS_PATH; upstream default unset
    local_xds: str | None  # LOCAL_XDS inline YAML; upstream default unset
    xds_on_demand: bool  # XDS_ON_DEMAND; upstream default false
    secret_ttl: float = field(metadata=_DURATION)  # seconds; SECRET_TTL, upstream 24h
    crl_path: str | None  # CRL_PATH; empty = unset; upstream default unset

    # in-pod and sockets
    inpod_uds: str  # INPOD_UDS; upstream default /var/run/ztunnel/ztunnel.sock
    inpod_port_reuse: bool  # INPOD_PORT_REUSE; upstream default true
    packet_mark: int | None  # SO_MARK, u32; PACKET_MARK, upstream 1337 shared / unset dedicated
    enable_orig_src: bool | None  # ENABLE_ORIG_SRC; upstream default unset (best effort)
    ipv6_enabled: bool  # IPV6_ENABLED; upstream default true
    keepalive_time: float = field(metadata=_DURATION)  # seconds; KEEPALIVE_TIME, upstream 180s
    keepalive_interval: float = field(metadata=_DURATION)  # seconds; upstream 180s
    keepalive_retries: int  # probes, u32; KEEPALIVE_RETRIES, upstream 9
    keepalive_enabled: bool  # KEEPALIVE_ENABLED; upstream default true
    user_timeout_enabled: bool  # USER_TIMEOUT_ENABLED; upstream default false

    # HBONE pool and HTTP/2
    pool_max_streams_per_connection: int  # streams, u16; upstream default 100
    pool_unused_release_timeout: float = field(metadata=_DURATION)  # seconds; upstream 5m
    http2_stream_window_size: int  # bytes, u32; upstream default 4194304 (4 MiB)
    http2_connection_window_size: int  # bytes, u32; upstream default 16777216 (16 MiB)
    http2_frame_size: int  # bytes, u32; upstream default 1048576 (1 MiB)
    termination_deadline: float = field(metadata=_DURATION)  # seconds; upstream 5s (§15)
    localhost_app_tunnel: bool  # LOCALHOST_APP_TUNNEL; upstream default true
    enable_response_baggage: bool  # ENABLE_RESPONSE_BAGGAGE; upstream default true
    tls12_enabled: bool  # TLS12_ENABLED == "true"; upstream default off (TLS 1.3 only)
    compliance_policy: str | None  # COMPLIANCE_POLICY (`pqc`); upstream default unset

    # listeners
    admin_port: int  # port; proxyConfig proxyAdminPort, upstream 15000 (localhost only)
    stats_port: int  # port; proxyConfig statsPort, upstream 15020
    readiness_port: int  # port; ZTUNNEL_READINESS_PORT (ours), upstream fixed 15021
    outbound_port: int  # port; ZTUNNEL_OUTBOUND_PORT (ours), upstream fixed 15001
    inbound_plaintext_port: int  # port; ZTUNNEL_INBOUND_PLAINTEXT_PORT (ours), upstream 15006
    inbound_port: int  # port; ZTUNNEL_INBOUND_PORT (ours), upstream fixed 15008
    socks5_port: int  # port; ZTUNNEL_SOCKS5_PORT (ours), upstream fixed 15080
    socks5_enabled: bool  # UNSTABLE_ENABLE_SOCKS5; upstream default off

    # DNS proxy
    dns_proxy: bool  # on unless metadata DNS_CAPTURE is present and not "true"; upstream on
    dns_proxy_addr: ProxyAddr  # metadata DNS_PROXY_ADDR; upstream default localhost:15053
    prefered_service_namespace: str | None  # PREFERED_SERVICE_NAMESPACE (sic); upstream unset

    # metadata and logging
    proxy_metadata: Mapping[str, str]  # mesh/PROXY_CONFIG proxyMetadata + ISTIO_META_* env
    metajson: Mapping[str, object]  # ISTIO_METAJSON_<K> parsed as JSON (xDS node metadata)
    istio_version: str  # ISTIO_META_ISTIO_VERSION; upstream default "unknown"
    authz_policy_info_logging: bool  # AUTHZ_POLICY_INFO_LOGGING == "true"; upstream off
    log_format: LogFormat  # LOG_FORMAT; "json" -> json, anything else plain
    log_level: str  # LOG_LEVEL (ours), else RUST_LOG; default "info"; raw spec text

    # worker processes
    workers: int  # processes; ZTUNNEL_WORKERS, else upstream worker-thread rules (§1.4)
    workers_source: str  # how `workers` was chosen, for the start-up log
    listener_migration: bool  # ZTUNNEL_LISTENER_MIGRATION (ours): tcp_migrate_req=1, default on

    config_warnings: tuple[str, ...]  # non-fatal problems for the caller to log

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        *,
        cpu_count: int,
        mesh_config_path: str = DEFAULT_MESH_CONFIG_PATH,
        path_exists: Callable[[str], bool] = os.path.exists,
    ) -> Config:
        """Parse `env` (upstream `construct_config`); raise InvalidEnvVar / ConfigError."""
        e = _Env(env)
        pc = _proxy_config(e, mesh_config_path)
        meta = _proxy_metadata(e, pc)
        metajson, warnings = _metajson(e)
        mode: ProxyMode = e.parsed("PROXY_MODE", _parse_proxy_mode) or "shared"
        workload_info = _workload_info(e, mode)
        local_xds_path, local_xds = e.text("LOCAL_XDS_PATH"), e.text("LOCAL_XDS")
        if local_xds_path is not None and local_xds is not None:
            raise ConfigError("LOCAL_XDS_PATH and LOCAL_XDS cannot both be set")
        in_cluster = e.text("KUBERNETES_SERVICE_HOST") is not None
        istiod = _ISTIOD_IN_CLUSTER if in_cluster else _ISTIOD_LOCAL
        fake_ca = e.flag("FAKE_CA", False)
        workers, workers_source = _workers(e, pc.concurrency, cpu_count)
        cfg = cls(
            proxy_mode=mode,
            workload_info=workload_info,
            enable_proxy=e.flag("ENABLE_PROXY", True),
            cluster_id=_cluster_id(e),
            cluster_domain=e.text_or("CLUSTER_DOMAIN", "cluster.local"),
            network=e.text_or("NETWORK", ""),
            node_name=e.text("NODE_NAME"),
            pod_name=e.text("POD_NAME"),
            pod_namespace=e.text("POD_NAMESPACE"),
            service_account=e.text("SERVICE_ACCOUNT"),
            instance_ip=e.text("INSTANCE_IP"),
            trust_domain=e.text_or("TRUST_DOMAIN", "cluster.local"),
            fake_ca=fake_ca,
            fake_ca_dir=e.text("FAKE_CA_DIR") or "/tmp/ztunnel-fake-ca",
            xds_address=_xds_address(e, pc, istiod),
            ca_address=_ca_address(e, fake_ca, istiod),
            xds_root_ca=_root_cert(e, "XDS_ROOT_CA", path_exists),
            ca_root_ca=_root_cert(e, "CA_ROOT_CA", path_exists),
            alt_xds_hostname=e.text("ALT_XDS_HOSTNAME"),
            alt_ca_hostname=e.text("ALT_CA_HOSTNAME"),
            auth_token=_auth_source(e, path_exists),
            xds_headers=_headers(e, "XDS_HEADER_"),
            ca_headers=_headers(e, "CA_HEADER_"),
            local_xds_path=local_xds_path,
            local_xds=local_xds,
            xds_on_demand=e.flag("XDS_ON_DEMAND", False),
            secret_ttl=e.duration("SECRET_TTL", 24 * 3600.0),
            crl_path=e.text("CRL_PATH") or None,
            inpod_uds=e.text_or("INPOD_UDS", "/var/run/ztunnel/ztunnel.sock"),
            inpod_port_reuse=e.flag("INPOD_PORT_REUSE", True),
            packet_mark=_packet_mark(e, mode),
            enable_orig_src=e.parsed("ENABLE_ORIG_SRC", parse_bool),
            ipv6_enabled=e.flag("IPV6_ENABLED", True),
            keepalive_time=e.duration("KEEPALIVE_TIME", 180.0),
            keepalive_interval=e.duration("KEEPALIVE_INTERVAL", 180.0),
            keepalive_retries=e.uint("KEEPALIVE_RETRIES", 32, 9),
            keepalive_enabled=e.flag("KEEPALIVE_ENABLED", True),
            user_timeout_enabled=e.flag("USER_TIMEOUT_ENABLED", False),
            pool_max_streams_per_connection=e.uint("POOL_MAX_STREAMS_PER_CONNECTION", 16, 100),
            pool_unused_release_timeout=e.duration("POOL_UNUSED_RELEASE_TIMEOUT", 300.0),
            http2_stream_window_size=e.uint("HTTP2_STREAM_WINDOW_SIZE", 32, 4 << 20),
            http2_connection_window_size=e.uint("HTTP2_CONNECTION_WINDOW_SIZE", 32, 16 << 20),
            http2_frame_size=e.uint("HTTP2_FRAME_SIZE", 32, 1 << 20),
            termination_deadline=_termination_deadline(e),
            localhost_app_tunnel=e.flag("LOCALHOST_APP_TUNNEL", True),
            enable_response_baggage=e.flag("ENABLE_RESPONSE_BAGGAGE", True),
            tls12_enabled=e.text("TLS12_ENABLED") == "true",
            compliance_policy=e.text("COMPLIANCE_POLICY") or None,
            admin_port=pc.proxy_admin_port or 15000,
            stats_port=pc.stats_port or 15020,
            readiness_port=e.port("ZTUNNEL_READINESS_PORT", 15021),
            outbound_port=e.port("ZTUNNEL_OUTBOUND_PORT", 15001),
            inbound_plaintext_port=e.port("ZTUNNEL_INBOUND_PLAINTEXT_PORT", 15006),
            inbound_port=e.port("ZTUNNEL_INBOUND_PORT", 15008),
            socks5_port=e.port("ZTUNNEL_SOCKS5_PORT", 15080),
            socks5_enabled=e.flag("UNSTABLE_ENABLE_SOCKS5", False),
            dns_proxy=meta.get("DNS_CAPTURE", "true").lower() == "true",
            dns_proxy_addr=_dns_proxy_addr(meta),
            prefered_service_namespace=e.text("PREFERED_SERVICE_NAMESPACE"),
            proxy_metadata=meta,
            metajson=metajson,
            istio_version=e.text_or("ISTIO_META_ISTIO_VERSION", "unknown"),
            authz_policy_info_logging=e.text("AUTHZ_POLICY_INFO_LOGGING") == "true",
            log_format="json" if e.text("LOG_FORMAT") == "json" else "plain",
            log_level=_log_level(e),
            workers=workers,
            workers_source=workers_source,
            listener_migration=e.flag("ZTUNNEL_LISTENER_MIGRATION", True),
            config_warnings=warnings,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Cross-field checks (upstream `validate_config`)."""
        if self.dns_proxy and self.xds_on_demand:
            raise ConfigError("DNS proxy does not currently support on-demand mode")
        if not self.enable_proxy and not self.dns_proxy:
            raise ConfigError("ztunnel run without any servers enabled")

    @property
    def illegal_ports(self) -> frozenset[int]:
        """Ports that traffic may not target, to prevent proxy self-loops (spec §2)."""
        ports = {self.outbound_port, self.inbound_plaintext_port, self.inbound_port}
        if self.socks5_enabled:
            ports.add(self.socks5_port)
        return frozenset(ports)

    @property
    def bind_any(self) -> str:
        """The wildcard address for 15001/15006/15008/15021/15020 binds."""
        return "::" if self.ipv6_enabled else "0.0.0.0"

    def ztunnel_identity(self) -> WorkloadInfo | None:
        """ztunnel's own workload, when POD_NAME, POD_NAMESPACE and SERVICE_ACCOUNT are all set."""
        if self.pod_name is None or self.pod_namespace is None or self.service_account is None:
            return None
        return WorkloadInfo(self.pod_name, self.pod_namespace, self.service_account)

    def to_dump(self) -> dict[str, object]:
        """The `config` object of admin `/config_dump`: camelCase keys, durations as secs/nanos.

        Secrets stay out: the auth token is written as its kind only, inline PEM is omitted.
        """
        out = {_camel(f.name): _dump_field(f.metadata, getattr(self, f.name)) for f in fields(self)}
        out["illegalPorts"] = sorted(self.illegal_ports)
        return out


def _packet_mark(e: _Env, mode: ProxyMode) -> int | None:
    mark = e.parsed("PACKET_MARK", lambda s: parse_uint(s, 32))
    if mark is None and mode == "shared":
        return DEFAULT_INPOD_MARK  # in-pod mode needs a mark to tell its own traffic apart
    return mark


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _dump_field(metadata: Mapping[str, object], value: object) -> object:
    if metadata.get("unit") == "duration" and isinstance(value, float):
        secs, nanos = divmod(round(value * _SEC), _SEC)
        return {"secs": secs, "nanos": nanos}
    return _dump_value(value)


def _dump_value(value: object) -> object:
    if isinstance(value, RootCert):
        if value.kind == "static":
            return {"kind": "static"}  # the PEM body is long and adds nothing to a dump
        return {"kind": value.kind, "value": value.value}
    if isinstance(value, AuthSource):
        return {"kind": value.kind}
    if isinstance(value, WorkloadInfo | ProxyAddr):
        return {_camel(f.name): getattr(value, f.name) for f in fields(value)}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return [_dump_value(v) for v in value]
    return value


# --- the catalogue (docs are generated from it; a test keeps it complete) -------------------

# fmt: off
ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("PROXY_MODE", "shared|dedicated", "shared",
           "one ztunnel for many pods, or a sidecar-like proxy for one workload"),
    EnvVar("PROXY_WORKLOAD_INFO", "namespace/name/sa", "",
           "the workload a dedicated proxy runs as; required when PROXY_MODE=dedicated"),
    EnvVar("ENABLE_PROXY", "bool", "true", "run the HBONE proxy listeners (15001/15006/15008)"),
    EnvVar("KUBERNETES_SERVICE_HOST", "presence", "",
           "if set, istiod defaults to istiod.istio-system.svc:15012, else localhost:15012"),
    EnvVar("ISTIO_META_CLUSTER_ID", "string", "", "cluster ID; wins over CLUSTER_ID"),
    EnvVar("CLUSTER_ID", "string", "Kubernetes", "cluster ID, sent as the clusterid gRPC header"),
    EnvVar("CLUSTER_DOMAIN", "string", "cluster.local", "DNS domain of the cluster"),
    EnvVar("NETWORK", "string", "", "the network this node is on"),
    EnvVar("NODE_NAME", "string", "",
           "the local node; limits cert prefetch, sent in xDS node metadata"),
    EnvVar("POD_NAME", "string", "",
           "ztunnel's own pod (with POD_NAMESPACE and SERVICE_ACCOUNT: its identity)"),
    EnvVar("POD_NAMESPACE", "string", "", "ztunnel's own namespace"),
    EnvVar("SERVICE_ACCOUNT", "string", "", "ztunnel's own service account"),
    EnvVar("INSTANCE_IP", "ip", "", "ztunnel's pod IP, used in the xDS node id"),
    EnvVar("TRUST_DOMAIN", "string", "cluster.local", "trust domain of ztunnel's own identity"),
    EnvVar("FAKE_CA", "bool", "false",
           "issue certificates from a local development root instead of a CA server"),
    EnvVar("FAKE_CA_DIR", "path", "/tmp/ztunnel-fake-ca",
           "where the FAKE_CA root key and cert live (shared by every ztunnel on the host)"),
    EnvVar("XDS_ADDRESS", "url", "mesh discoveryAddress, else istiod",
           "xDS server; empty disables xDS; https:// is added when scheme-less"),
    EnvVar("CA_ADDRESS", "url", "istiod",
           "CA server; ignored with FAKE_CA; https:// is added when scheme-less"),
    EnvVar("XDS_ROOT_CA", "path|SYSTEM|PEM", "./var/run/secrets/istio/root-cert.pem",
           "trust roots for the xDS connection"),
    EnvVar("CA_ROOT_CA", "path|SYSTEM|PEM", "./var/run/secrets/istio/root-cert.pem",
           "trust roots for the CA connection"),
    EnvVar("ALT_XDS_HOSTNAME", "string", "", "extra name accepted in the xDS server certificate"),
    EnvVar("ALT_CA_HOSTNAME", "string", "", "extra name accepted in the CA server certificate"),
    EnvVar("AUTH_TOKEN", "path|token", "./var/run/secrets/tokens/istio-token if present",
           "bearer token for xDS and CA: a file re-read per call, or a literal"),
    EnvVar("XDS_HEADER_*", "string", "",
           "XDS_HEADER_<K>=v adds gRPC metadata k: v to the xDS stream"),
    EnvVar("CA_HEADER_*", "string", "",
           "CA_HEADER_<K>=v adds gRPC metadata k: v to CreateCertificate"),
    EnvVar("LOCAL_XDS_PATH", "path", "", "YAML file of static workloads, services and policies"),
    EnvVar("LOCAL_XDS", "yaml", "", "the same YAML inline; exclusive with LOCAL_XDS_PATH"),
    EnvVar("XDS_ON_DEMAND", "bool", "false",
           "look up addresses on demand; incompatible with the DNS proxy"),
    EnvVar("SECRET_TTL", "duration", "24h", "requested workload certificate lifetime"),
    EnvVar("CRL_PATH", "path", "", "certificate revocation list to enforce; empty = none"),
    EnvVar("INPOD_UDS", "path", "/var/run/ztunnel/ztunnel.sock",
           "ZDS unix socket from istio-cni (shared mode)"),
    EnvVar("INPOD_PORT_REUSE", "bool", "true", "SO_REUSEPORT on in-pod listeners"),
    EnvVar("PACKET_MARK", "u32", "1337 (shared), unset (dedicated)", "SO_MARK for proxy sockets"),
    EnvVar("ENABLE_ORIG_SRC", "bool", "unset (best effort)",
           "require (true) or never use (false) source IP preservation"),
    EnvVar("IPV6_ENABLED", "bool", "true", "bind [::] rather than 0.0.0.0; IPv6 DNS"),
    EnvVar("KEEPALIVE_TIME", "duration", "180s", "TCP keepalive idle time"),
    EnvVar("KEEPALIVE_INTERVAL", "duration", "180s", "TCP keepalive probe interval"),
    EnvVar("KEEPALIVE_RETRIES", "u32", "9", "TCP keepalive probe count"),
    EnvVar("KEEPALIVE_ENABLED", "bool", "true", "set TCP keepalives on proxied sockets"),
    EnvVar("USER_TIMEOUT_ENABLED", "bool", "false",
           "set TCP_USER_TIMEOUT = time + retries x interval"),
    EnvVar("POOL_MAX_STREAMS_PER_CONNECTION", "u16", "100",
           "HBONE streams per pooled connection before opening another"),
    EnvVar("POOL_UNUSED_RELEASE_TIMEOUT", "duration", "5m",
           "idle time before a pooled HBONE connection is closed"),
    EnvVar("HTTP2_STREAM_WINDOW_SIZE", "u32", "4194304", "HTTP/2 initial stream window, bytes"),
    EnvVar("HTTP2_CONNECTION_WINDOW_SIZE", "u32", "16777216", "HTTP/2 connection window, bytes"),
    EnvVar("HTTP2_FRAME_SIZE", "u32", "1048576", "HTTP/2 max frame size, bytes"),
    EnvVar("CONNECTION_TERMINATION_DEADLINE", "duration", "5s",
           "how long shutdown drains connections"),
    EnvVar("TERMINATION_GRACE_PERIOD_SECONDS", "u64", "",
           "pod grace period; deadline = secs-5 (>10) or secs-1, at least 1"),
    EnvVar("LOCALHOST_APP_TUNNEL", "bool", "true",
           "deliver PROXY-protocol app tunnels over loopback"),
    EnvVar("ENABLE_RESPONSE_BAGGAGE", "bool", "true", "send and parse baggage headers on HBONE"),
    EnvVar("TLS12_ENABLED", "\"true\"", "off", "allow TLS 1.2 besides 1.3 on HBONE"),
    EnvVar("COMPLIANCE_POLICY", "string", "", "pqc = post-quantum key exchange only"),
    EnvVar("UNSTABLE_ENABLE_SOCKS5", "bool", "false", "listen for SOCKS5 on 127.0.0.1"),
    EnvVar("ZTUNNEL_READINESS_PORT", "port", "15021", "readiness listener port"),
    EnvVar("ZTUNNEL_OUTBOUND_PORT", "port", "15001", "outbound capture listener port"),
    EnvVar("ZTUNNEL_INBOUND_PLAINTEXT_PORT", "port", "15006",
           "inbound plaintext capture listener port"),
    EnvVar("ZTUNNEL_INBOUND_PORT", "port", "15008", "inbound HBONE listener port"),
    EnvVar("ZTUNNEL_SOCKS5_PORT", "port", "15080", "SOCKS5 listener port"),
    EnvVar("PROXY_CONFIG", "yaml|json", "",
           "ProxyConfig fields overriding the mesh file's defaultConfig field by field"),
    EnvVar("ISTIO_META_*", "string", "", "proxy metadata (prefix stripped), sent in the xDS node"),
    EnvVar("ISTIO_META_DNS_CAPTURE", "string", "on",
           "DNS proxy stays on unless this is set and not \"true\""),
    EnvVar("ISTIO_META_DNS_PROXY_ADDR", "localhost:port|ip:port", "localhost:15053",
           "DNS proxy listen address"),
    EnvVar("ISTIO_METAJSON_*", "json", "", "JSON values added to the xDS node metadata"),
    EnvVar("ISTIO_META_ISTIO_VERSION", "string", "unknown",
           "Istio version for istio_build and config_dump"),
    EnvVar("PREFERED_SERVICE_NAMESPACE", "string", "",
           "namespace the DNS proxy prefers after the local one"),
    EnvVar("AUTHZ_POLICY_INFO_LOGGING", "\"true\"", "off", "log authorization decisions at INFO"),
    EnvVar("LOG_FORMAT", "plain|json", "plain", "log line format"),
    EnvVar("LOG_LEVEL", "level[,target=level]", "info", "log filter; wins over RUST_LOG"),
    EnvVar("RUST_LOG", "level[,target=level]", "info",
           "upstream's log filter, honoured when LOG_LEVEL is unset"),
    EnvVar("ZTUNNEL_WORKERS", "positive int", "",
           "worker process count; wins over the rules below"),
    EnvVar("ZTUNNEL_LISTENER_MIGRATION", "bool", "true",
           "set net.ipv4.tcp_migrate_req=1 in every netns we listen in, so connections queued "
           "on a worker that dies are served by the others"),
    EnvVar("ZTUNNEL_WORKER_THREADS", "N|P%|0", "see ZTUNNEL_RESOURCE_CPU_*",
           "worker count: N, P% of cpus, or 0 = all cpus"),
    EnvVar("ZTUNNEL_CPU_LIMIT", "usize", "logical cpus", "cpu count override (downward API)"),
    EnvVar("ZTUNNEL_RESOURCE_CPU_LIMIT", "cpu quantity", "",
           "explicit cpu limit (2, 1.5, 500m), rounded up; the default worker count"),
    EnvVar("ZTUNNEL_RESOURCE_CPU_REQUEST", "cpu quantity", "",
           "cpu request; raises the default worker count's floor"),
)
# fmt: on
