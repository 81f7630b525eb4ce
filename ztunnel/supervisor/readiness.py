"""Readiness tracking and the `/healthz/ready` endpoint (port 15021).

Upstream `src/readiness.rs` keeps one guard per pending task; here the supervisor keeps the
pending names in a set (reference §3.4). Ready means no task is pending.
"""

from __future__ import annotations

from ztunnel.supervisor.http import Request, Response, Routes


class Readiness:
    """Named startup tasks that must all complete before the node reports ready."""

    def __init__(self) -> None:
        self._pending: set[str] = set()

    def register(self, name: str) -> None:
        """Add a task that blocks readiness until `mark_ready(name)`."""
        self._pending.add(name)

    def mark_ready(self, name: str) -> None:
        """The task is done; unknown names are ignored."""
        self._pending.discard(name)

    def rearm(self, name: str) -> None:
        """Block readiness again (e.g. `workload proxy manager` on a ZDS disconnect)."""
        self._pending.add(name)

    def pending(self) -> list[str]:
        return sorted(self._pending)

    def is_ready(self) -> bool:
        return not self._pending


def readiness_routes(readiness: Readiness) -> Routes:
    """The readiness server's route table: only `/healthz/ready`."""

    async def ready(req: Request) -> Response:
        return ready_response(req, readiness)

    return {"/healthz/ready": ready}


def ready_response(req: Request, readiness: Readiness) -> Response:
    """GET: 200 `ready` or 500 listing the pending tasks, `, `-separated (upstream)."""
    if req.method != "GET":
        return Response.empty(405)
    pending = readiness.pending()
    if not pending:
        return Response.text(200, "ready\n")
    return Response.text(500, f"not ready, pending: {', '.join(pending)}\n")
