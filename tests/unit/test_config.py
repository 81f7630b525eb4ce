"""Config.from_env: defaults, good values and every error path (spec §1, §2, §15)."""

from __future__ import annotations

import ast
import json
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.core import config as config_module
from ztunnel.core.config import (
    ENV_VARS,
    AuthSource,
    Config,
    ProxyAddr,
    RootCert,
    WorkloadInfo,
    parse_duration,
    parse_uint,
)
from ztunnel.core.errors import ConfigError, InvalidEnvVar

NO_MESH = "/nonexistent/ztunnel-test/mesh"
BOOL_WHY = "provided string was not `true` or `false`"
DIGIT_WHY = "invalid digit found in string"
RANGE_WHY = "number too large to fit in target type"


def load(
    env: Mapping[str, str] | None = None,
    *,
    cpu_count: int = 8,
    mesh: str = NO_MESH,
    existing: frozenset[str] = frozenset(),
) -> Config:
    return Config.from_env(
        env or {}, cpu_count=cpu_count, mesh_config_path=mesh, path_exists=existing.__contains__
    )


def env_error(env: Mapping[str, str]) -> str:
    with pytest.raises(InvalidEnvVar) as info:
        load(env)
    return str(info.value)


# --- defaults ------------------------------------------------------------------------------

DEFAULTS: list[tuple[str, object]] = [
    ("proxy_mode", "shared"),
    ("workload_info", None),
    ("enable_proxy", True),
    ("fake_ca", False),
    ("fake_ca_dir", "/tmp/ztunnel-fake-ca"),
    ("xds_address", "https://localhost:15012"),
    ("ca_address", "https://localhost:15012"),
    ("xds_root_ca", RootCert(kind="static", value="./var/run/secrets/istio/root-cert.pem")),
    ("ca_root_ca", RootCert(kind="static", value="./var/run/secrets/istio/root-cert.pem")),
    ("alt_xds_hostname", None),
    ("alt_ca_hostname", None),
    ("auth_token", AuthSource(kind="none", value="")),
    ("cluster_id", "Kubernetes"),
    ("cluster_domain", "cluster.local"),
    ("network", ""),
    ("node_name", None),
    ("pod_name", None),
    ("pod_namespace", None),
    ("service_account", None),
    ("instance_ip", None),
    ("trust_domain", "cluster.local"),
    ("local_xds_path", None),
    ("local_xds", None),
    ("xds_on_demand", False),
    ("inpod_uds", "/var/run/ztunnel/ztunnel.sock"),
    ("inpod_port_reuse", True),
    ("packet_mark", 1337),
    ("secret_ttl", 86400.0),
    ("pool_max_streams_per_connection", 100),
    ("pool_unused_release_timeout", 300.0),
    ("http2_stream_window_size", 4194304),
    ("http2_connection_window_size", 16777216),
    ("http2_frame_size", 1048576),
    ("termination_deadline", 5.0),
    ("enable_orig_src", None),
    ("ipv6_enabled", True),
    ("socks5_enabled", False),
    ("dns_proxy", True),
    ("dns_proxy_addr", ProxyAddr(host=None, port=15053)),
    ("prefered_service_namespace", None),
    ("crl_path", None),
    ("keepalive_time", 180.0),
    ("keepalive_interval", 180.0),
    ("keepalive_retries", 9),
    ("keepalive_enabled", True),
    ("user_timeout_enabled", False),
    ("localhost_app_tunnel", True),
    ("enable_response_baggage", True),
    ("tls12_enabled", False),
    ("compliance_policy", None),
    ("authz_policy_info_logging", False),
    ("istio_version", "unknown"),
    ("log_format", "plain"),
    ("log_level", "info"),
    ("proxy_metadata", {}),
    ("metajson", {}),
    ("xds_headers", ()),
    ("ca_headers", ()),
    ("admin_port", 15000),
    ("stats_port", 15020),
    ("readiness_port", 15021),
    ("outbound_port", 15001),
    ("inbound_plaintext_port", 15006),
    ("inbound_port", 15008),
    ("socks5_port", 15080),
    ("workers", 2),
    ("listener_migration", True),
    ("config_warnings", ()),
]


@pytest.mark.parametrize(("name", "expected"), DEFAULTS)
def test_default_matches_upstream(name: str, expected: object) -> None:
    assert getattr(load(), name) == expected


def test_defaults_table_covers_every_field() -> None:
    assert {f.name for f in fields(Config)} - {n for n, _ in DEFAULTS} == {"workers_source"}


# --- good values ---------------------------------------------------------------------------

GOOD = [
    ({"ENABLE_PROXY": "false"}, "enable_proxy", False),
    ({"FAKE_CA": "true"}, "fake_ca", True),
    ({"FAKE_CA": "true"}, "ca_address", None),
    ({"FAKE_CA_DIR": "/run/ca"}, "fake_ca_dir", "/run/ca"),
    (
        {"KUBERNETES_SERVICE_HOST": "10.0.0.1"},
        "xds_address",
        "https://istiod.istio-system.svc:15012",
    ),
    ({"KUBERNETES_SERVICE_HOST": ""}, "ca_address", "https://istiod.istio-system.svc:15012"),
    ({"XDS_ADDRESS": ""}, "xds_address", None),
    ({"XDS_ADDRESS": "istiod:15012"}, "xds_address", "https://istiod:15012"),
    ({"XDS_ADDRESS": "http://127.0.0.1:15010"}, "xds_address", "http://127.0.0.1:15010"),
    ({"XDS_ADDRESS": "https://[::1]:15012"}, "xds_address", "https://[::1]:15012"),
    ({"CA_ADDRESS": ""}, "ca_address", None),
    ({"CA_ADDRESS": "ca.example:15012"}, "ca_address", "https://ca.example:15012"),
    ({"CA_ADDRESS": "bad uri", "FAKE_CA": "true"}, "ca_address", None),
    ({"XDS_ROOT_CA": "SYSTEM"}, "xds_root_ca", RootCert(kind="system", value="SYSTEM")),
    ({"CA_ROOT_CA": "-----BEGIN"}, "ca_root_ca", RootCert(kind="static", value="-----BEGIN")),
    ({"ALT_XDS_HOSTNAME": "istiod.alt"}, "alt_xds_hostname", "istiod.alt"),
    ({"ALT_CA_HOSTNAME": "ca.alt"}, "alt_ca_hostname", "ca.alt"),
    ({"AUTH_TOKEN": "s3cret"}, "auth_token", AuthSource(kind="static", value="s3cret")),
    ({"CLUSTER_ID": "c1"}, "cluster_id", "c1"),
    ({"CLUSTER_ID": "c1", "ISTIO_META_CLUSTER_ID": "c2"}, "cluster_id", "c2"),
    ({"CLUSTER_DOMAIN": "corp.local"}, "cluster_domain", "corp.local"),
    ({"NETWORK": "nw1"}, "network", "nw1"),
    ({"NODE_NAME": "node-a"}, "node_name", "node-a"),
    ({"POD_NAME": "zt-1"}, "pod_name", "zt-1"),
    ({"POD_NAMESPACE": "istio-system"}, "pod_namespace", "istio-system"),
    ({"SERVICE_ACCOUNT": "ztunnel"}, "service_account", "ztunnel"),
    ({"INSTANCE_IP": "10.1.2.3"}, "instance_ip", "10.1.2.3"),
    ({"TRUST_DOMAIN": "example.org"}, "trust_domain", "example.org"),
    (
        {"LOCAL_XDS_PATH": "./examples/localhost.yaml"},
        "local_xds_path",
        "./examples/localhost.yaml",
    ),
    ({"LOCAL_XDS": "workloads: []"}, "local_xds", "workloads: []"),
    ({"XDS_ON_DEMAND": "true", "ISTIO_META_DNS_CAPTURE": "false"}, "xds_on_demand", True),
    ({"INPOD_UDS": "/tmp/zds.sock"}, "inpod_uds", "/tmp/zds.sock"),
    ({"INPOD_PORT_REUSE": "false"}, "inpod_port_reuse", False),
    ({"PACKET_MARK": "0"}, "packet_mark", 0),
    ({"PACKET_MARK": "4294967295"}, "packet_mark", 4294967295),
    ({"PACKET_MARK": "+7"}, "packet_mark", 7),
    ({"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "ns/n/sa"}, "packet_mark", None),
    ({"SECRET_TTL": "1h"}, "secret_ttl", 3600.0),
    ({"POOL_MAX_STREAMS_PER_CONNECTION": "65535"}, "pool_max_streams_per_connection", 65535),
    ({"POOL_UNUSED_RELEASE_TIMEOUT": "300ms"}, "pool_unused_release_timeout", 0.3),
    ({"HTTP2_STREAM_WINDOW_SIZE": "65535"}, "http2_stream_window_size", 65535),
    ({"HTTP2_CONNECTION_WINDOW_SIZE": "1048576"}, "http2_connection_window_size", 1048576),
    ({"HTTP2_FRAME_SIZE": "16384"}, "http2_frame_size", 16384),
    ({"ENABLE_ORIG_SRC": "true"}, "enable_orig_src", True),
    ({"ENABLE_ORIG_SRC": "false"}, "enable_orig_src", False),
    ({"IPV6_ENABLED": "false"}, "ipv6_enabled", False),
    ({"UNSTABLE_ENABLE_SOCKS5": "true"}, "socks5_enabled", True),
    ({"PREFERED_SERVICE_NAMESPACE": "shared"}, "prefered_service_namespace", "shared"),
    ({"CRL_PATH": "/etc/crl.pem"}, "crl_path", "/etc/crl.pem"),
    ({"CRL_PATH": ""}, "crl_path", None),
    ({"KEEPALIVE_TIME": "30s"}, "keepalive_time", 30.0),
    ({"KEEPALIVE_INTERVAL": "1m"}, "keepalive_interval", 60.0),
    ({"KEEPALIVE_RETRIES": "3"}, "keepalive_retries", 3),
    ({"KEEPALIVE_ENABLED": "false"}, "keepalive_enabled", False),
    ({"USER_TIMEOUT_ENABLED": "true"}, "user_timeout_enabled", True),
    ({"LOCALHOST_APP_TUNNEL": "false"}, "localhost_app_tunnel", False),
    ({"ENABLE_RESPONSE_BAGGAGE": "false"}, "enable_response_baggage", False),
    ({"TLS12_ENABLED": "true"}, "tls12_enabled", True),
    ({"TLS12_ENABLED": "1"}, "tls12_enabled", False),
    ({"COMPLIANCE_POLICY": "pqc"}, "compliance_policy", "pqc"),
    ({"AUTHZ_POLICY_INFO_LOGGING": "true"}, "authz_policy_info_logging", True),
    ({"AUTHZ_POLICY_INFO_LOGGING": "yes"}, "authz_policy_info_logging", False),
    ({"ISTIO_META_ISTIO_VERSION": "1.28.0"}, "istio_version", "1.28.0"),
    ({"LOG_FORMAT": "json"}, "log_format", "json"),
    ({"LOG_FORMAT": "JSON"}, "log_format", "plain"),
    ({"RUST_LOG": "debug"}, "log_level", "debug"),
    (
        {"LOG_LEVEL": "warn,ztunnel.xds=debug", "RUST_LOG": "trace"},
        "log_level",
        "warn,ztunnel.xds=debug",
    ),
    ({"LOG_LEVEL": "", "RUST_LOG": "error"}, "log_level", "error"),
    ({"LOG_LEVEL": "INFO,"}, "log_level", "INFO,"),
    ({"ZTUNNEL_READINESS_PORT": "25021"}, "readiness_port", 25021),
    ({"ZTUNNEL_OUTBOUND_PORT": "25001"}, "outbound_port", 25001),
    ({"ZTUNNEL_INBOUND_PLAINTEXT_PORT": "25006"}, "inbound_plaintext_port", 25006),
    ({"ZTUNNEL_INBOUND_PORT": "25008"}, "inbound_port", 25008),
    ({"ZTUNNEL_SOCKS5_PORT": "25080"}, "socks5_port", 25080),
    ({"ISTIO_META_DNS_CAPTURE": "false"}, "dns_proxy", False),
    ({"ISTIO_META_DNS_CAPTURE": "TRUE"}, "dns_proxy", True),
    ({"ISTIO_META_DNS_CAPTURE": ""}, "dns_proxy", False),
    ({"ISTIO_META_FOO": "bar", "NOT_META": "x"}, "proxy_metadata", {"FOO": "bar"}),
    ({"XDS_HEADER_X_Tenant": "a b"}, "xds_headers", (("x_tenant", "a b"),)),
    ({"CA_HEADER_B": "2", "CA_HEADER_A": "1"}, "ca_headers", (("a", "1"), ("b", "2"))),
    ({"ISTIO_METAJSON_LABELS": '{"app": "x"}'}, "metajson", {"LABELS": {"app": "x"}}),
]


@pytest.mark.parametrize(("env", "name", "expected"), GOOD)
def test_good_value_is_parsed(env: dict[str, str], name: str, expected: object) -> None:
    assert getattr(load(env), name) == expected


# --- bad values ----------------------------------------------------------------------------

BAD = [
    ({"FAKE_CA": "True"}, f"FAKE_CA=True ({BOOL_WHY})"),
    ({"FAKE_CA": "1"}, f"FAKE_CA=1 ({BOOL_WHY})"),
    ({"ENABLE_PROXY": "yes"}, f"ENABLE_PROXY=yes ({BOOL_WHY})"),
    ({"IPV6_ENABLED": ""}, f"IPV6_ENABLED= ({BOOL_WHY})"),
    ({"ENABLE_ORIG_SRC": "auto"}, f"ENABLE_ORIG_SRC=auto ({BOOL_WHY})"),
    ({"UNSTABLE_ENABLE_SOCKS5": "on"}, f"UNSTABLE_ENABLE_SOCKS5=on ({BOOL_WHY})"),
    ({"XDS_ON_DEMAND": "TRUE"}, f"XDS_ON_DEMAND=TRUE ({BOOL_WHY})"),
    ({"INPOD_PORT_REUSE": "0"}, f"INPOD_PORT_REUSE=0 ({BOOL_WHY})"),
    ({"KEEPALIVE_ENABLED": "no"}, f"KEEPALIVE_ENABLED=no ({BOOL_WHY})"),
    ({"USER_TIMEOUT_ENABLED": "1"}, f"USER_TIMEOUT_ENABLED=1 ({BOOL_WHY})"),
    ({"LOCALHOST_APP_TUNNEL": "False"}, f"LOCALHOST_APP_TUNNEL=False ({BOOL_WHY})"),
    ({"ENABLE_RESPONSE_BAGGAGE": "t"}, f"ENABLE_RESPONSE_BAGGAGE=t ({BOOL_WHY})"),
    ({"SECRET_TTL": "1.5h"}, "SECRET_TTL=1.5h (invalid duration '1.5h')"),
    ({"SECRET_TTL": "10x"}, "SECRET_TTL=10x (unknown duration unit 'x')"),
    ({"SECRET_TTL": ""}, "SECRET_TTL= (Empty input)"),
    ({"KEEPALIVE_TIME": "-5s"}, "KEEPALIVE_TIME=-5s (invalid duration '-5s')"),
    (
        {"KEEPALIVE_INTERVAL": "1m+2*3"},
        "KEEPALIVE_INTERVAL=1m+2*3 (not support '+' with '*' calculate)",
    ),
    (
        {"POOL_UNUSED_RELEASE_TIMEOUT": "5 m 3 4"},
        "POOL_UNUSED_RELEASE_TIMEOUT=5 m 3 4 (invalid duration '5 m 3 4')",
    ),
    (
        {"CONNECTION_TERMINATION_DEADLINE": "soon"},
        "CONNECTION_TERMINATION_DEADLINE=soon (invalid duration 'soon')",
    ),
    ({"SECRET_TTL": "600000y"}, "SECRET_TTL=600000y (overflow)"),
    (
        {"POOL_MAX_STREAMS_PER_CONNECTION": "65536"},
        f"POOL_MAX_STREAMS_PER_CONNECTION=65536 ({RANGE_WHY})",
    ),
    (
        {"POOL_MAX_STREAMS_PER_CONNECTION": "-1"},
        f"POOL_MAX_STREAMS_PER_CONNECTION=-1 ({DIGIT_WHY})",
    ),
    (
        {"HTTP2_STREAM_WINDOW_SIZE": "4294967296"},
        f"HTTP2_STREAM_WINDOW_SIZE=4294967296 ({RANGE_WHY})",
    ),
    ({"HTTP2_CONNECTION_WINDOW_SIZE": "1e6"}, f"HTTP2_CONNECTION_WINDOW_SIZE=1e6 ({DIGIT_WHY})"),
    ({"HTTP2_FRAME_SIZE": " 1"}, f"HTTP2_FRAME_SIZE= 1 ({DIGIT_WHY})"),
    ({"PACKET_MARK": "4294967296"}, f"PACKET_MARK=4294967296 ({RANGE_WHY})"),
    ({"PACKET_MARK": "0x539"}, f"PACKET_MARK=0x539 ({DIGIT_WHY})"),
    ({"KEEPALIVE_RETRIES": "1_0"}, f"KEEPALIVE_RETRIES=1_0 ({DIGIT_WHY})"),
    ({"KEEPALIVE_RETRIES": ""}, "KEEPALIVE_RETRIES= (cannot parse integer from empty string)"),
    (
        {"TERMINATION_GRACE_PERIOD_SECONDS": "-1"},
        f"TERMINATION_GRACE_PERIOD_SECONDS=-1 ({DIGIT_WHY})",
    ),
    (
        {"ZTUNNEL_READINESS_PORT": "0"},
        "ZTUNNEL_READINESS_PORT=0 (port must be between 1 and 65535)",
    ),
    ({"ZTUNNEL_OUTBOUND_PORT": "65536"}, f"ZTUNNEL_OUTBOUND_PORT=65536 ({RANGE_WHY})"),
    ({"ZTUNNEL_INBOUND_PLAINTEXT_PORT": "x"}, f"ZTUNNEL_INBOUND_PLAINTEXT_PORT=x ({DIGIT_WHY})"),
    ({"ZTUNNEL_INBOUND_PORT": "0"}, "ZTUNNEL_INBOUND_PORT=0 (port must be between 1 and 65535)"),
    ({"ZTUNNEL_SOCKS5_PORT": "70000"}, f"ZTUNNEL_SOCKS5_PORT=70000 ({RANGE_WHY})"),
    ({"PROXY_MODE": "Shared"}, "PROXY_MODE=Shared (PROXY_MODE must be one of dedicated, shared)"),
    ({"PROXY_MODE": ""}, "PROXY_MODE= (PROXY_MODE must be one of dedicated, shared)"),
    ({"XDS_ADDRESS": "https://"}, "XDS_ADDRESS=https:// (empty authority)"),
    ({"XDS_ADDRESS": "istiod /x"}, "XDS_ADDRESS=istiod /x (invalid uri character)"),
    ({"XDS_ADDRESS": "/path"}, "XDS_ADDRESS=/path (invalid format)"),
    (
        {"CA_ADDRESS": "https://ca:port"},
        "CA_ADDRESS=https://ca:port (Port could not be cast to integer value as 'port')",
    ),
    ({"XDS_HEADER_": "v"}, "XDS_HEADER_=v (invalid header name)"),
    ({"XDS_HEADER_A B": "v"}, "XDS_HEADER_A B=v (invalid header name)"),
    ({"CA_HEADER_TOKEN-BIN": "v"}, "CA_HEADER_TOKEN-BIN=v (invalid header name)"),
    ({"CA_HEADER_X": "caf\u00e9"}, "CA_HEADER_X=caf\u00e9 (invalid header value)"),
    ({"XDS_HEADER_X": "a\nb"}, "XDS_HEADER_X=a\nb (invalid header value)"),
    ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL=verbose (unknown log level 'verbose')"),
    ({"LOG_LEVEL": "info,=debug"}, "LOG_LEVEL=info,=debug (missing target in '=debug')"),
    ({"RUST_LOG": "ztunnel"}, "RUST_LOG=ztunnel (unknown log level 'ztunnel')"),
    ({"RUST_LOG": "a=loud"}, "RUST_LOG=a=loud (unknown log level 'loud')"),
]


@pytest.mark.parametrize(("env", "message"), BAD)
def test_bad_value_fails_with_upstream_message(env: dict[str, str], message: str) -> None:
    assert env_error(env) == f"invalid env var {message}"


def test_invalid_env_var_carries_key_value_and_reason() -> None:
    with pytest.raises(InvalidEnvVar) as info:
        load({"FAKE_CA": "True"})
    assert (info.value.key, info.value.value, info.value.why) == ("FAKE_CA", "True", BOOL_WHY)


CROSS_FIELD = [
    (
        {"LOCAL_XDS_PATH": "a.yaml", "LOCAL_XDS": "{}"},
        "LOCAL_XDS_PATH and LOCAL_XDS cannot both be set",
    ),
    ({"PROXY_MODE": "dedicated"}, "PROXY_WORKLOAD_INFO is required in dedicated mode"),
    ({"XDS_ON_DEMAND": "true"}, "DNS proxy does not currently support on-demand mode"),
    (
        {"ENABLE_PROXY": "false", "ISTIO_META_DNS_CAPTURE": "false"},
        "ztunnel run without any servers enabled",
    ),
]


@pytest.mark.parametrize(("env", "message"), CROSS_FIELD)
def test_cross_field_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env)
    assert not isinstance(info.value, InvalidEnvVar)
    assert str(info.value) == message


def test_dns_alone_is_enough_to_run() -> None:
    assert load({"ENABLE_PROXY": "false"}).dns_proxy


# --- workload info -------------------------------------------------------------------------


def test_dedicated_mode_reads_workload_info() -> None:
    cfg = load({"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "default/local/sa"})
    assert cfg.proxy_mode == "dedicated"
    assert cfg.workload_info == WorkloadInfo(
        name="local", namespace="default", service_account="sa"
    )


@pytest.mark.parametrize(
    "value", ["ns/name", "ns/name/sa/extra", "ns//sa", "/name/sa", "ns/name/", ""]
)
def test_malformed_workload_info_is_rejected(value: str) -> None:
    message = env_error({"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": value})
    assert message == (
        f"invalid env var PROXY_WORKLOAD_INFO={value} "
        "(must match the format 'namespace/name/service-account')"
    )


def test_shared_mode_ignores_workload_info() -> None:
    assert load({"PROXY_WORKLOAD_INFO": "only/two"}).workload_info is None


# --- trust roots and tokens ----------------------------------------------------------------


def test_existing_root_cert_path_is_a_file() -> None:
    cfg = load({"CA_ROOT_CA": "/etc/ca.pem"}, existing=frozenset({"/etc/ca.pem"}))
    assert cfg.ca_root_ca == RootCert(kind="file", value="/etc/ca.pem")


def test_default_root_cert_used_when_present() -> None:
    default = "./var/run/secrets/istio/root-cert.pem"
    assert load(existing=frozenset({default})).xds_root_ca == RootCert(kind="file", value=default)


@pytest.mark.parametrize(
    ("env", "existing", "expected"),
    [
        (
            {},
            {"./var/run/secrets/tokens/istio-token"},
            ("file", "./var/run/secrets/tokens/istio-token"),
        ),
        ({"AUTH_TOKEN": "/tok"}, {"/tok"}, ("file", "/tok")),
        ({"AUTH_TOKEN": "/tok"}, set(), ("static", "/tok")),
        ({}, set(), ("none", "")),
    ],
)
def test_auth_token_source(
    env: dict[str, str], existing: set[str], expected: tuple[str, str]
) -> None:
    token = load(env, existing=frozenset(existing)).auth_token
    assert (token.kind, token.value) == expected


def test_static_token_is_not_in_repr_or_dump() -> None:
    cfg = load({"AUTH_TOKEN": "hunter2"})
    assert "hunter2" not in repr(cfg)
    assert "hunter2" not in json.dumps(cfg.to_dump())


# --- DNS proxy address ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost:15054", ProxyAddr(host=None, port=15054)),
        ("127.0.0.1:53", ProxyAddr(host="127.0.0.1", port=53)),
        ("0.0.0.0:15053", ProxyAddr(host="0.0.0.0", port=15053)),
        ("[::1]:15053", ProxyAddr(host="::1", port=15053)),
        ("[0:0::1]:53", ProxyAddr(host="::1", port=53)),
    ],
)
def test_dns_proxy_addr_forms(value: str, expected: ProxyAddr) -> None:
    assert load({"ISTIO_META_DNS_PROXY_ADDR": value}).dns_proxy_addr == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("not-an-address", "invalid socket address syntax"),
        ("localhost:abc", DIGIT_WHY),
        ("localhost:65536", RANGE_WHY),
        ("::1:53", "invalid socket address syntax"),
        ("127.0.0.1", "invalid socket address syntax"),
        ("127.0.0.1:", "invalid socket address syntax"),
        ("127.0.0.1:70000", "invalid socket address syntax"),
        ("example.com:53", "invalid socket address syntax"),
    ],
)
def test_bad_dns_proxy_addr_is_fatal(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({"ISTIO_META_DNS_PROXY_ADDR": value})
    assert str(info.value) == f"failed to parse DNS_PROXY_ADDR: {value} ({why})"


# --- mesh config file and PROXY_CONFIG -----------------------------------------------------

MESH_YAML = """
defaultConfig:
  discoveryAddress: istiod-mesh.istio-system.svc:15012
  proxyAdminPort: 15099
  statsPort: 15888
  concurrency: 3
  proxyMetadata:
    FOO: foo
    ISTIO_META_FOOBAR: from-mesh
    DNS_CAPTURE: "false"
"""

PROXY_CONFIG_JSON = json.dumps(
    {
        "discoveryAddress": "istiod-rev0.istio-system-2:15012",
        "proxyAdminPort": 15999,
        "proxyMetadata": {
            "ISTIO_META_BAR": "bar",
            "ISTIO_META_FOOBAR": "from-env-config",
            "NO_PREFIX": "no-prefix",
        },
    }
)


@pytest.fixture
def mesh_file(tmp_path: Path) -> str:
    path = tmp_path / "mesh"
    path.write_text(MESH_YAML)
    return str(path)


def test_mesh_file_alone(mesh_file: str) -> None:
    cfg = load(mesh=mesh_file)
    assert (cfg.admin_port, cfg.stats_port, cfg.workers) == (15099, 15888, 3)
    assert cfg.xds_address == "https://istiod-mesh.istio-system.svc:15012"
    assert cfg.ca_address == "https://localhost:15012"  # the CA never takes discoveryAddress
    assert dict(cfg.proxy_metadata) == {"FOO": "foo", "FOOBAR": "from-mesh", "DNS_CAPTURE": "false"}
    assert not cfg.dns_proxy


def test_proxy_config_overrides_mesh_file_field_by_field(mesh_file: str) -> None:
    cfg = load({"PROXY_CONFIG": PROXY_CONFIG_JSON}, mesh=mesh_file)
    assert cfg.admin_port == 15999
    assert cfg.stats_port == 15888
    assert cfg.xds_address == "https://istiod-rev0.istio-system-2:15012"
    assert cfg.proxy_metadata["FOO"] == "foo"
    assert cfg.proxy_metadata["BAR"] == "bar"
    assert cfg.proxy_metadata["FOOBAR"] == "from-env-config"
    assert cfg.proxy_metadata["NO_PREFIX"] == "no-prefix"


def test_istio_meta_env_wins_over_proxy_config(mesh_file: str) -> None:
    env = {
        "PROXY_CONFIG": PROXY_CONFIG_JSON,
        "ISTIO_META_FOOBAR": "from-env",
        "ISTIO_META_CLUSTER_ID": "test-cluster",
        "NOT_INCLUDED": "x",
    }
    cfg = load(env, mesh=mesh_file)
    assert cfg.proxy_metadata["FOOBAR"] == "from-env"
    assert cfg.proxy_metadata["CLUSTER_ID"] == "test-cluster"
    assert cfg.cluster_id == "test-cluster"
    assert "NOT_INCLUDED" not in cfg.proxy_metadata


def test_xds_address_env_wins_over_discovery_address(mesh_file: str) -> None:
    assert load({"XDS_ADDRESS": "x:1"}, mesh=mesh_file).xds_address == "https://x:1"


def test_proxy_config_yaml_and_empty() -> None:
    assert load({"PROXY_CONFIG": "statsPort: 16020\nunknownField: 1"}).stats_port == 16020
    assert load({"PROXY_CONFIG": ""}).stats_port == 15020
    assert load({"PROXY_CONFIG": "concurrency: 0"}).workers == 8


def test_empty_discovery_address_disables_xds() -> None:
    assert load({"PROXY_CONFIG": 'discoveryAddress: ""'}).xds_address is None


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("{", "failed parsing proxy config: "),
        ("- a list", "expected a mapping"),
        (
            "proxyAdminPort: http",
            "proxyAdminPort must be an integer between 1 and 65535, got 'http'",
        ),
        ("statsPort: 0", "statsPort must be an integer between 1 and 65535, got 0"),
        ("concurrency: 70000", "concurrency must be an integer between 0 and 65535, got 70000"),
        ("proxyAdminPort: true", "proxyAdminPort must be an integer between 1 and 65535, got True"),
        ("discoveryAddress: 5", "discoveryAddress must be a string, got 5"),
        ("proxyMetadata: {DNS_CAPTURE: true}", "proxyMetadata must map strings to strings"),
    ],
)
def test_bad_proxy_config_names_the_variable(value: str, why: str) -> None:
    assert env_error({"PROXY_CONFIG": value}).startswith(
        f"invalid env var PROXY_CONFIG={value} ({why}"
    )


def test_bad_discovery_address_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^invalid uri: /x \(invalid format\)$"):
        load({"PROXY_CONFIG": "discoveryAddress: /x"})


@pytest.mark.parametrize("content", ["defaultConfig: [", "- 1", "defaultConfig: 3"])
def test_bad_mesh_file_names_the_path(tmp_path: Path, content: str) -> None:
    path = tmp_path / "mesh"
    path.write_text(content)
    with pytest.raises(
        ConfigError, match=f"^failed parsing mesh config file {re.escape(str(path))}: "
    ):
        load(mesh=str(path))


def test_unreadable_mesh_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^failed parsing mesh config file "):
        load(mesh=str(tmp_path))  # a directory


def test_empty_mesh_file_is_empty_config(tmp_path: Path) -> None:
    (tmp_path / "mesh").write_text("")
    assert load(mesh=str(tmp_path / "mesh")).admin_port == 15000


# --- worker processes ----------------------------------------------------------------------

WORKERS = [
    # (env, cpu_count, proxy config, expected)
    ({}, 8, "", 2),
    ({}, 1, "", 2),
    ({}, 32, "", 8),
    ({}, 13, "", 4),
    ({"ZTUNNEL_CPU_LIMIT": "32"}, 4, "", 8),
    ({"ZTUNNEL_RESOURCE_CPU_REQUEST": "8"}, 8, "", 8),
    ({"ZTUNNEL_RESOURCE_CPU_REQUEST": "1"}, 8, "", 2),
    ({"ZTUNNEL_RESOURCE_CPU_REQUEST": "2500m"}, 40, "", 10),
    ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "16"}, 8, "", 16),
    ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "1"}, 8, "", 1),
    ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "500m"}, 8, "", 1),
    ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "2500m"}, 8, "", 3),
    ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "1.5"}, 8, "", 2),
    ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "16", "ZTUNNEL_RESOURCE_CPU_REQUEST": "4"}, 8, "", 16),
    ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "4", "ZTUNNEL_RESOURCE_CPU_REQUEST": "8"}, 8, "", 8),
    ({"ZTUNNEL_WORKER_THREADS": "4"}, 2, "", 4),
    ({"ZTUNNEL_WORKER_THREADS": "50%", "ZTUNNEL_CPU_LIMIT": "8"}, 2, "", 4),
    ({"ZTUNNEL_WORKER_THREADS": "30%", "ZTUNNEL_CPU_LIMIT": "16"}, 2, "", 5),
    ({"ZTUNNEL_WORKER_THREADS": "10%", "ZTUNNEL_CPU_LIMIT": "4"}, 2, "", 1),
    ({"ZTUNNEL_WORKER_THREADS": "100%"}, 6, "", 6),
    ({"ZTUNNEL_WORKER_THREADS": "50%", "ZTUNNEL_RESOURCE_CPU_LIMIT": "3"}, 64, "", 2),
    ({"ZTUNNEL_WORKER_THREADS": "0", "ZTUNNEL_CPU_LIMIT": "6"}, 2, "", 6),
    ({"ZTUNNEL_WORKER_THREADS": "0"}, 12, "", 12),
    ({"ZTUNNEL_WORKER_THREADS": "0", "ZTUNNEL_CPU_LIMIT": "0"}, 12, "", 1),
    ({"ZTUNNEL_WORKER_THREADS": "3"}, 8, "concurrency: 5", 3),
    ({}, 8, "concurrency: 5", 5),
    ({"ZTUNNEL_CPU_LIMIT": "6"}, 2, "concurrency: 0", 6),
    ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "16"}, 8, "concurrency: 5", 5),
    ({"ZTUNNEL_WORKERS": "3", "ZTUNNEL_WORKER_THREADS": "7"}, 8, "concurrency: 5", 3),
]


@pytest.mark.parametrize(("env", "cpus", "proxy_config", "expected"), WORKERS)
def test_worker_count(env: dict[str, str], cpus: int, proxy_config: str, expected: int) -> None:
    cfg = load({**env, "PROXY_CONFIG": proxy_config}, cpu_count=cpus)
    assert cfg.workers == expected


@pytest.mark.parametrize(
    ("env", "source"),
    [
        ({"ZTUNNEL_WORKERS": "3"}, "ZTUNNEL_WORKERS=3"),
        ({}, "default max(ceil(cpus*0.25)=1, request=0, 2) of 4 cpus (logical)"),
        ({"ZTUNNEL_WORKER_THREADS": "5"}, "ZTUNNEL_WORKER_THREADS=5"),
        ({"ZTUNNEL_WORKER_THREADS": "50%"}, "ZTUNNEL_WORKER_THREADS=50% of 4 cpus (logical)"),
        (
            {"ZTUNNEL_WORKER_THREADS": "0", "ZTUNNEL_CPU_LIMIT": "6"},
            "ZTUNNEL_WORKER_THREADS=0 (all 6 cpus (ZTUNNEL_CPU_LIMIT))",
        ),
        ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "2"}, "max(ZTUNNEL_RESOURCE_CPU_LIMIT=2, request=0)"),
        ({"PROXY_CONFIG": "concurrency: 7"}, "proxy config concurrency=7"),
        ({"PROXY_CONFIG": "concurrency: 0"}, "proxy config concurrency=0 (all 4 cpus (logical))"),
    ],
)
def test_worker_source_explains_the_choice(env: dict[str, str], source: str) -> None:
    assert load(env, cpu_count=4).workers_source == source


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"ZTUNNEL_WORKER_THREADS": "101%"},
            "ZTUNNEL_WORKER_THREADS=101% (percentage must be between 0 and 100)",
        ),
        (
            {"ZTUNNEL_WORKER_THREADS": "0%"},
            "ZTUNNEL_WORKER_THREADS=0% (percentage must be between 0 and 100)",
        ),
        (
            {"ZTUNNEL_WORKER_THREADS": "nan%"},
            "ZTUNNEL_WORKER_THREADS=nan% (percentage must be between 0 and 100)",
        ),
        (
            {"ZTUNNEL_WORKER_THREADS": "x%"},
            "ZTUNNEL_WORKER_THREADS=x% (invalid percentage: invalid float literal)",
        ),
        (
            {"ZTUNNEL_WORKER_THREADS": "-1"},
            f"ZTUNNEL_WORKER_THREADS=-1 (invalid number: {DIGIT_WHY})",
        ),
        (
            {"ZTUNNEL_WORKER_THREADS": "two"},
            f"ZTUNNEL_WORKER_THREADS=two (invalid number: {DIGIT_WHY})",
        ),
        ({"ZTUNNEL_CPU_LIMIT": "1.5"}, f"ZTUNNEL_CPU_LIMIT=1.5 ({DIGIT_WHY})"),
        (
            {"ZTUNNEL_RESOURCE_CPU_LIMIT": "0"},
            "ZTUNNEL_RESOURCE_CPU_LIMIT=0 (must be a positive CPU quantity)",
        ),
        (
            {"ZTUNNEL_RESOURCE_CPU_LIMIT": "-1"},
            "ZTUNNEL_RESOURCE_CPU_LIMIT=-1 (must be a positive CPU quantity)",
        ),
        (
            {"ZTUNNEL_RESOURCE_CPU_LIMIT": "inf"},
            "ZTUNNEL_RESOURCE_CPU_LIMIT=inf (must be a positive CPU quantity)",
        ),
        (
            {"ZTUNNEL_RESOURCE_CPU_LIMIT": "2Gi"},
            "ZTUNNEL_RESOURCE_CPU_LIMIT=2Gi (invalid float literal)",
        ),
        (
            {"ZTUNNEL_RESOURCE_CPU_REQUEST": "m"},
            "ZTUNNEL_RESOURCE_CPU_REQUEST=m (invalid float literal)",
        ),
        ({"ZTUNNEL_WORKERS": "0"}, "ZTUNNEL_WORKERS=0 (must be a positive integer)"),
        ({"ZTUNNEL_WORKERS": "many"}, f"ZTUNNEL_WORKERS=many ({DIGIT_WHY})"),
    ],
)
def test_bad_worker_setting(env: dict[str, str], message: str) -> None:
    assert env_error(env) == f"invalid env var {message}"


def test_bad_worker_setting_fails_even_when_overridden() -> None:
    # Validated eagerly so a typo is found now, not when the overriding variable is removed.
    with pytest.raises(InvalidEnvVar):
        load({"ZTUNNEL_WORKERS": "2", "ZTUNNEL_RESOURCE_CPU_LIMIT": "lots"})


# --- termination deadline (spec §15) -------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 5.0),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "30"}, 25.0),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "11"}, 6.0),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "10"}, 9.0),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "2"}, 1.0),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "1"}, 1.0),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "0"}, 1.0),
        (
            {"CONNECTION_TERMINATION_DEADLINE": "12s", "TERMINATION_GRACE_PERIOD_SECONDS": "30"},
            12.0,
        ),
        ({"CONNECTION_TERMINATION_DEADLINE": "500ms"}, 0.5),
    ],
)
def test_termination_deadline(env: dict[str, str], expected: float) -> None:
    assert load(env).termination_deadline == expected


# --- durations (duration_str semantics) ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("5", 5.0),
        ("1m", 60.0),
        ("300ms", 0.3),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("24h", 86400.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1mon", 2592000.0),
        ("1y", 31536000.0),
        ("10us", 0.00001),
        ("10\u00b5s", 0.00001),
        ("7ns", 7e-9),
        ("2 Hours", 7200.0),
        ("1MIN", 60.0),
        ("3m+31", 211.0),
        ("3m + 31", 211.0),
        ("1s 2", 3.0),
        ("1m*10", 600.0),
        ("10*1m", 600.0),
        ("1m*500ms", 30.0),
        ("  5s  ", 5.0),
        ("0", 0.0),
    ],
)
def test_duration_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", " ", "s", "1.5s", "-1s", "+1s", "1 2", "1x", "1s+", "1s*2+3", "5 s 6 7"]
)
def test_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


_UNITS = st.sampled_from([("h", 3600), ("m", 60), ("s", 1), ("ms", 0.001)])


@given(st.lists(st.tuples(st.integers(0, 10_000), _UNITS), min_size=1, max_size=5))
def test_duration_concatenation_adds_terms(terms: list[tuple[int, tuple[str, float]]]) -> None:
    text = "".join(f"{n}{unit}" for n, (unit, _) in terms)
    assert parse_duration(text) == pytest.approx(sum(n * scale for n, (_, scale) in terms))


@given(st.integers(0, (1 << 32) - 1))
def test_u32_roundtrip(n: int) -> None:
    assert parse_uint(str(n), 32) == n


@given(st.text(max_size=8))
def test_uint_never_accepts_what_rust_rejects(text: str) -> None:
    try:
        value = parse_uint(text, 16)
    except ValueError:
        return
    assert re.fullmatch(r"\+?[0-9]+", text) and value < 65536


# --- metadata, headers, warnings -----------------------------------------------------------


def test_unparseable_metajson_is_skipped_with_a_warning() -> None:
    cfg = load({"ISTIO_METAJSON_GOOD": "[1, 2]", "ISTIO_METAJSON_BAD": "{nope"})
    assert dict(cfg.metajson) == {"GOOD": [1, 2]}
    assert cfg.config_warnings == ("failed to parse ISTIO_METAJSON_BAD={nope",)


def test_metajson_is_not_proxy_metadata() -> None:
    assert "ISTIO_METAJSON_X" not in load({"ISTIO_METAJSON_X": "1"}).proxy_metadata


def test_proxy_metadata_is_read_only() -> None:
    cfg = load({"ISTIO_META_A": "1"})
    with pytest.raises(TypeError):
        cfg.proxy_metadata["A"] = "2"  # type: ignore[index]


# --- derived values ------------------------------------------------------------------------


def test_illegal_ports_follow_listeners_and_socks5() -> None:
    assert load().illegal_ports == {15001, 15006, 15008}
    cfg = load({"UNSTABLE_ENABLE_SOCKS5": "true", "ZTUNNEL_OUTBOUND_PORT": "25001"})
    assert cfg.illegal_ports == {25001, 15006, 15008, 15080}


def test_bind_any_follows_ipv6() -> None:
    assert load().bind_any == "::"
    assert load({"IPV6_ENABLED": "false"}).bind_any == "0.0.0.0"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"POD_NAME": "zt", "POD_NAMESPACE": "istio-system", "SERVICE_ACCOUNT": "ztunnel"},
            WorkloadInfo(name="zt", namespace="istio-system", service_account="ztunnel"),
        ),
        ({"POD_NAME": "zt", "POD_NAMESPACE": "istio-system"}, None),
        ({}, None),
    ],
)
def test_ztunnel_identity_needs_all_three(
    env: dict[str, str], expected: WorkloadInfo | None
) -> None:
    assert load(env).ztunnel_identity() == expected


# --- dump and transport --------------------------------------------------------------------


def test_dump_is_camel_case_json_with_upstream_durations() -> None:
    cfg = load({"POOL_UNUSED_RELEASE_TIMEOUT": "1500ms", "XDS_HEADER_A": "1"})
    dump = json.loads(json.dumps(cfg.to_dump()))
    assert dump["poolUnusedReleaseTimeout"] == {"secs": 1, "nanos": 500_000_000}
    assert dump["secretTtl"] == {"secs": 86400, "nanos": 0}
    assert dump["terminationDeadline"] == {"secs": 5, "nanos": 0}
    assert dump["xdsRootCa"] == {"kind": "static"}
    assert dump["dnsProxyAddr"] == {"host": None, "port": 15053}
    assert dump["xdsHeaders"] == [["a", "1"]]
    assert dump["illegalPorts"] == [15001, 15006, 15008]
    assert all(re.fullmatch(r"[a-z][A-Za-z0-9]*", key) for key in dump)


def test_dump_writes_file_paths_and_identity() -> None:
    env = {"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "ns/n/sa", "XDS_ROOT_CA": "/r.pem"}
    dump = load(env, existing=frozenset({"/r.pem"})).to_dump()
    assert dump["xdsRootCa"] == {"kind": "file", "value": "/r.pem"}
    assert dump["workloadInfo"] == {"name": "n", "namespace": "ns", "serviceAccount": "sa"}


def test_config_pickles_for_spawned_workers() -> None:
    cfg = load({"ISTIO_META_A": "1", "ISTIO_METAJSON_B": '{"c": 2}'})
    assert pickle.loads(pickle.dumps(cfg)) == cfg


# --- the catalogue and the import rule -----------------------------------------------------


class RecordingEnv(Mapping[str, str]):
    """An environment that records which names were looked up by key."""

    def __init__(self, data: dict[str, str]) -> None:
        self.data = data
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


FAMILIES = tuple(v.name[:-1] for v in ENV_VARS if v.name.endswith("*"))
FULL_ENV = {
    "PROXY_MODE": "dedicated",
    "PROXY_WORKLOAD_INFO": "ns/name/sa",
    "LOCAL_XDS_PATH": "x.yaml",
    "LOG_LEVEL": "info",
    "RUST_LOG": "info",
    "ISTIO_META_DNS_CAPTURE": "false",
    "ISTIO_META_DNS_PROXY_ADDR": "localhost:15053",
    "ISTIO_META_CLUSTER_ID": "c",
    "ISTIO_META_ISTIO_VERSION": "1",
    "XDS_HEADER_A": "1",
    "CA_HEADER_A": "1",
    "ISTIO_METAJSON_A": "1",
    "ZTUNNEL_WORKER_THREADS": "2",
    "ZTUNNEL_RESOURCE_CPU_LIMIT": "2",
    "TERMINATION_GRACE_PERIOD_SECONDS": "30",
}


def test_every_variable_read_is_catalogued() -> None:
    names = {v.name for v in ENV_VARS}
    read: set[str] = set()
    for data in ({}, FULL_ENV):
        env = RecordingEnv(dict(data))
        Config.from_env(env, cpu_count=4, mesh_config_path=NO_MESH, path_exists=lambda _: False)
        read |= env.read
    uncatalogued = {k for k in read if k not in names and not k.startswith(FAMILIES)}
    assert uncatalogued == set()
    assert names - read - {v.name for v in ENV_VARS if v.name.endswith("*")} == set()


def test_catalogue_has_no_duplicates_or_blank_meanings() -> None:
    names = [v.name for v in ENV_VARS]
    assert len(names) == len(set(names))
    assert all(v.meaning and v.type for v in ENV_VARS)


def test_config_module_stays_sans_io() -> None:
    tree = ast.parse(Path(config_module.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    forbidden = {
        "asyncio",
        "socket",
        "ssl",
        "zmq",
        "grpc",
        "uvloop",
        "prometheus_client",
        "time",
        "logging",
    }
    assert imported & forbidden == set()


# --- listener migration (ours) -----------------------------------------------------------------


def test_listener_migration_defaults_on_and_can_be_turned_off() -> None:
    assert load({}).listener_migration is True
    assert load({"ZTUNNEL_LISTENER_MIGRATION": "false"}).listener_migration is False
    assert env_error({"ZTUNNEL_LISTENER_MIGRATION": "perhaps"}).startswith(
        "invalid env var ZTUNNEL_LISTENER_MIGRATION=perhaps"
    )
