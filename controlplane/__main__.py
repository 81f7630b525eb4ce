"""`python -m controlplane` / `ztunnel-controlplane`: run the local control plane until signalled.

    python -m controlplane --config examples/localhost.yaml --listen 127.0.0.1:15012 \\
        --ca-dir /tmp/ztunnel-fake-ca [--require-token TOKEN]

Point ztunnels at it with XDS_ADDRESS=https://127.0.0.1:15012 and
XDS_ROOT_CA=<ca-dir>/root-cert.pem. Edits of the config file are pushed to every connected
ztunnel. With `--listen 127.0.0.1:0` the kernel picks the port; the "listening on" log line
names it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

# gRPC's C core logs every GOAWAY and reconnect at INFO to stderr; keep it to errors unless
# the operator asked for more. Read once, when grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import uvloop

from controlplane import server
from ztunnel.core.errors import ConfigError
from ztunnel.fakeca import DEFAULT_DIR, FakeCAError
from ztunnel.telemetry import InvalidLevelSpec, configure_logging

DESCRIPTION = "Run the local Istio control plane (delta xDS and CA) for ztunnel."


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ztunnel-controlplane", description=DESCRIPTION)
    p.add_argument("--config", help="LOCAL_XDS-format YAML to serve (watched for edits)")
    p.add_argument("--listen", default="127.0.0.1:15012", help="host:port (default %(default)s)")
    p.add_argument(
        "--ca-dir",
        default=DEFAULT_DIR,
        help="root CA directory, created if needed; its root-cert.pem is what clients trust "
        "(default %(default)s, the FAKE_CA_DIR default)",
    )
    p.add_argument("--require-token", help="reject clients without 'authorization: Bearer <T>'")
    p.add_argument("--trust-domain", default="cluster.local", help="(default %(default)s)")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    p.add_argument("--log-format", choices=("plain", "json"), default="plain")
    p.add_argument(
        "--no-ca", action="store_true", help="serve xDS only, without the CreateCertificate service"
    )
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    try:
        cp = await server.start(
            args.config,
            ca_dir=args.ca_dir,
            listen=args.listen,
            require_token=args.require_token,
            trust_domain=args.trust_domain,
            with_ca=not args.no_ca,
        )
    except (ConfigError, FakeCAError, OSError, RuntimeError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await cp.stop(grace=1.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        configure_logging(args.log_format, args.log_level, "controlplane")
    except InvalidLevelSpec as e:
        print(f"Error: invalid --log-level {args.log_level!r}: {e}", file=sys.stderr)
        return 1
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
