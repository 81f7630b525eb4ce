"""Admin endpoints (localhost:15000): index, /config_dump, /logging, /quitquitquit.

Behaviour follows upstream `src/admin.rs` (reference §3.2). The `/debug/pprof/*` endpoints
are not provided (there is no pprof/jemalloc equivalent here); they answer 404 like any
unknown path.
"""

from __future__ import annotations

import asyncio
import html
import inspect
import json
import logging
from collections.abc import Awaitable, Callable

from ztunnel.supervisor.http import Request, Response, Routes
from ztunnel.telemetry import InvalidLevelSpec, LogControl, parse_spec

logger = logging.getLogger(__name__)

# Upstream waits up to `self_termination_deadline` (default 5 s) for the shutdown trigger.
QUIT_TIMEOUT = 5.0  # seconds

# Upstream's help text, except that it shows `{mod}={level}`: upstream advertises
# `{mod}:{level}`, which its own validator rejects (reference §3.2 [QUIRK]).
HELP_TEXT = """
usage: POST /logging\t\t\t\t\t\t(To list current level)
usage: POST /logging?level=<level>\t\t\t\t(To change global levels)
usage: POST /logging?level={mod1}={level1},{mod2}={level2}\t(To change specific mods' logging level)

hint: loglevel:\terror|warn|info|debug|trace|off
hint: mod_name:\tthe module name, i.e. ztunnel::proxy or access
"""

_ENDPOINTS = (
    ("quitquitquit", "shut down the server"),
    ("config_dump", "dump the current Ztunnel configuration"),
    ("logging", "query/changing logging levels"),
)

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Ztunnel Admin</title>
<style>
table {{ font-family: sans-serif; border-collapse: collapse; }}
td, th {{ text-align: left; padding: 4px; }}
tr.gray {{ background-color: #dddddd; }}
</style>
</head>
<body>
<table>
<tr><th>Command</th><th>Description</th></tr>
{rows}</table>
</body>
</html>
"""

ConfigDump = Callable[[], dict[str, object]]
OnQuit = Callable[[], Awaitable[None] | None]


def admin_routes(
    *,
    config_dump: ConfigDump,
    log_control: LogControl,
    on_quit: OnQuit,
    quit_timeout: float = QUIT_TIMEOUT,
) -> Routes:
    """The admin server's route table."""

    async def index(_: Request) -> Response:
        return Response(200, index_page().encode(), "text/html; charset=utf-8")

    async def dump(_: Request) -> Response:
        # Any method, as upstream (no method check on /config_dump).
        body = json.dumps(config_dump(), indent=2, ensure_ascii=False)
        return Response(200, body.encode(), "application/json")

    async def logging_(req: Request) -> Response:
        return handle_logging(req, log_control)

    async def quit_(req: Request) -> Response:
        return await handle_quit(req, on_quit, quit_timeout)

    return {
        "/": index,
        "/config_dump": dump,
        "/logging": logging_,
        "/quitquitquit": quit_,
    }


def index_page() -> str:
    """Our own index page: one row per endpoint, alternate rows shaded as upstream's."""
    rows = "".join(
        f'<tr class="{"gray" if i % 2 else "plain"}"><td><a href="{html.escape(path)}">'
        f"{html.escape(path)}</a></td><td>{html.escape(text)}</td></tr>\n"
        for i, (path, text) in enumerate(_ENDPOINTS)
    )
    return _PAGE.format(rows=rows)


def handle_logging(req: Request, control: LogControl) -> Response:
    """POST only; `?level=` appends clauses, `?reset` restores the default first."""
    if req.method != "POST":
        return Response.text(405, f"Invalid HTTP method\n {HELP_TEXT}")
    level = req.query.get("level", "")
    reset = "reset" in req.query
    if not reset and not level:
        return _current_level(control)
    if level:
        try:
            parse_spec(level)
        except InvalidLevelSpec:
            return Response.text(400, f"Invalid level provided: {level}\n{HELP_TEXT}")
    if reset:
        control.reset()
    if level:
        control.append(level)
    logger.info("new log filter is %s", control.current())
    return _current_level(control)


def _current_level(control: LogControl) -> Response:
    return Response.text(200, f"current log level is {control.current()}\n")


async def handle_quit(req: Request, on_quit: OnQuit, deadline: float) -> Response:
    """POST triggers shutdown (like SIGTERM) and answers once the trigger is delivered."""
    if req.method != "POST":
        return Response.empty(405)
    result = on_quit()
    if inspect.isawaitable(result):
        try:
            await asyncio.wait_for(result, deadline)
        except TimeoutError:
            logger.warning("Graceful shutdown did not complete in %ss, terminating now", deadline)
        else:
            logger.info("Shutdown completed gracefully")
    return Response.text(200, "shutdown now\n")
