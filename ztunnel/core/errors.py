"""Error hierarchy: one root, stable reasons for metrics and logs."""

from __future__ import annotations


class ZtunnelError(Exception):
    """Root of every error ztunnel raises on purpose."""

    reason: str = "error"


class ConfigError(ZtunnelError):
    """A bad environment variable or configuration file; fatal at start."""

    reason = "config"


class InvalidEnvVar(ConfigError):
    """`invalid env var K=V (reason)`, as upstream's config parser reports it."""

    def __init__(self, key: str, value: str, why: str) -> None:
        super().__init__(f"invalid env var {key}={value} ({why})")
        self.key = key
        self.value = value
        self.why = why


class ResourceRejected(ZtunnelError):
    """One xDS / local-config resource that could not be converted; the rest still apply."""

    reason = "rejected"

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.name = name
        self.why = why


class SchemaMismatch(ZtunnelError):
    """A supervisor<->worker message with a schema version this process does not speak."""

    reason = "schema"
