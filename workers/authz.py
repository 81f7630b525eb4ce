"""Authorization glue: evaluate a connection against its workload's policies, and log as upstream.

The decision is pure (`ztunnel.core.rbac`); here the policies are selected for the
destination workload, upstream's authz log lines are written (DEBUG, or INFO with
AUTHZ_POLICY_INFO_LOGGING), and live connections are re-checked on policy changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from workers.tracking import ConnectionTracker
from ztunnel.core import rbac
from ztunnel.core.state import ProxyState

log = logging.getLogger("authorization")

POLICY_REJECTION = "connection closed due to policy rejection"
POLICY_CHANGE = "connection closed due to policy change"


@dataclass(frozen=True, slots=True)
class AuthzContext:
    """What a tracked inbound connection needs to be judged again later."""

    workload_uid: str
    conn: rbac.Connection


def check(state: ProxyState, ctx: AuthzContext, *, info_logging: bool) -> rbac.Decision:
    local = state.workload_by_uid(ctx.workload_uid)
    policies = state.policies_for_workload(local) if local is not None else ()
    decision = rbac.evaluate(policies, ctx.conn)
    level = logging.INFO if info_logging else logging.DEBUG
    if log.isEnabledFor(level):
        for line in decision.logs:
            log.log(level, "%s", line)
    return decision


def rejection(decision: rbac.Decision) -> str:
    """Upstream's access-log error text for a denied connection."""
    return f"{POLICY_REJECTION}: {decision.reason}"


def recheck(tracker: ConnectionTracker, state: ProxyState, *, info_logging: bool) -> int:
    """Close every tracked connection the current policies no longer allow; returns how many."""
    closed = 0
    for conn in tracker:
        ctx = conn.authz
        if not isinstance(ctx, AuthzContext):
            continue
        decision = check(state, ctx, info_logging=info_logging)
        if decision.allowed:
            continue
        log.info(
            "connection %s -> %s closed because it's no longer allowed after a policy update",
            conn.src_addr,
            conn.dst_addr,
        )
        conn.response_flags = "DENY"
        conn.error = POLICY_CHANGE
        conn.flow.abort()
        closed += 1
    return closed
