"""The `ztunnel` command: `ztunnel [proxy [ztunnel]]`, `ztunnel version`, `ztunnel help`."""

from __future__ import annotations

import os

# gRPC's C core logs to stderr on its own (e.g. "Got goaway" at INFO); only errors, please.
# Must be set before grpc is imported anywhere.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import asyncio
import logging
import resource
import sys

import uvloop

from ztunnel.core.config import Config
from ztunnel.core.errors import ConfigError
from ztunnel.supervisor.app import Supervisor
from ztunnel.telemetry import configure_logging
from ztunnel.version import BuildInfo

log = logging.getLogger("ztunnel.supervisor")

HELP = """\
ztunnel: Istio's ambient-mesh node proxy

Usage: ztunnel [COMMAND]

Commands:
  proxy [ztunnel]  run the proxy (the default)
  version          print build information
  help             print this help

Configuration comes from the environment (upstream ztunnel's variables); see the README.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "proxy"
    if command == "version":
        print(BuildInfo.current())
        return 0
    if command in ("help", "-h", "--help"):
        print(HELP, end="")
        return 0
    if command != "proxy":
        print(f"unknown command: {command}\n", file=sys.stderr)
        print(HELP, end="", file=sys.stderr)
        return 1
    return run_proxy()


def run_proxy() -> int:
    try:
        config = Config.from_env(os.environ, cpu_count=os.cpu_count() or 1)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    logs = configure_logging(config.log_format, config.log_level, "supervisor")
    for warning in config.config_warnings:
        log.warning("%s", warning)
    _raise_fd_limit()
    log.info("running with config: %s", config.to_dump())
    supervisor = Supervisor(config, logs)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(supervisor.run())
    logging.shutdown()
    return code


def _raise_fd_limit() -> None:
    """Raise RLIMIT_NOFILE soft -> hard, as upstream main.rs does; workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("failed to raise file descriptor limit: %s", e)
