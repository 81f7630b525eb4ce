"""Worker process entry point: `python -m workers --index N --runtime-dir DIR [--fd-channel FD]`.

Started by the supervisor with spawn/exec (never a plain fork: the supervisor may hold gRPC
state, which is not fork-safe). The worker reads the same environment as the supervisor.
In shared (in-pod) mode `--fd-channel` names the inherited end of the supervisor's fd
channel (`ztunnel.fdchannel`), over which pods' netns fds arrive.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys

import uvloop

from workers.worker import Endpoints, Worker
from ztunnel import fdchannel
from ztunnel.core import ipc
from ztunnel.core.config import Config
from ztunnel.core.errors import ConfigError
from ztunnel.telemetry import configure_logging

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """If the supervisor dies without draining us, drain and exit rather than linger."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ztunnel-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--fd-channel", type=int, default=None, metavar="FD")
    args = parser.parse_args(argv)
    _die_with_parent()
    try:
        config = Config.from_env(os.environ, cpu_count=os.cpu_count() or 1)
    except ConfigError as e:
        print(f"worker {args.index}: {e}", file=sys.stderr)
        return ipc.EXIT_BOOT_ERROR
    logs = configure_logging(config.log_format, config.log_level, f"worker{args.index}")
    try:
        channel = fdchannel.from_fd(args.fd_channel) if args.fd_channel is not None else None
    except OSError as e:
        print(f"worker {args.index}: bad --fd-channel {args.fd_channel}: {e}", file=sys.stderr)
        return ipc.EXIT_BOOT_ERROR
    worker = Worker(
        config, args.index, Endpoints.in_dir(args.runtime_dir), logs, fd_channel=channel
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(worker.run())
    logging.shutdown()
    return code
