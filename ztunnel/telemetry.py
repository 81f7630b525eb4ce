"""Logging for the supervisor and the workers: upstream's line formats, one write per line.

Mirrors upstream `src/telemetry.rs` (reference §4.6). Fields travel in
`extra={"fields": {...}}`; wrap a value in `Unquoted` for upstream's `%` (Display) fields.
Only the standard library is imported: workers load this before anything else.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

TRACE = 5  # tracing's TRACE, below logging.DEBUG
OFF = logging.CRITICAL + 10  # above every level: nothing passes
LEVELS: Mapping[str, int] = {
    "off": OFF,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}
DEFAULT_SPEC = "info"
_PREFIX = "ztunnel."
# Rust's `<str as Debug>` escapes; other non-printable characters become `\u{hex}`.
_ESCAPES = {"\0": "\\0", "\t": "\\t", "\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}

logging.addLevelName(TRACE, "TRACE")


class Unquoted(str):
    """A field value written bare in plain logs, like a tracing `%value` (Display) field."""

    __slots__ = ()


class InvalidLevelSpec(ValueError):
    """A log level spec clause that is neither a level nor `target=level`."""


# ---------------------------------------------------------------------------------------------
# Formatting


def target_of(logger_name: str) -> str:
    """Upstream strips `ztunnel::` from targets; we strip the `ztunnel.` package prefix."""
    return logger_name.removeprefix(_PREFIX)


def level_word(levelno: int) -> str:
    """tracing has five levels; CRITICAL folds into `error`, custom levels round down."""
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warn"
    if levelno >= logging.INFO:
        return "info"
    if levelno >= logging.DEBUG:
        return "debug"
    return "trace"


def timestamp(created: float) -> str:
    """RFC 3339 UTC with microseconds, as tracing_subscriber's SystemTime writes it."""
    return datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def debug_quote(text: str) -> str:
    """Quote `text` the way Rust's `{:?}` formats a `&str`."""
    return '"' + "".join(_escape_char(c) for c in text) + '"'


def _escape_char(c: str) -> str:
    escaped = _ESCAPES.get(c)
    if escaped is not None:
        return escaped
    if c.isprintable():
        return c
    return f"\\u{{{ord(c):x}}}"


def plain_value(value: object) -> str:
    """Strings quoted, numbers and bools bare, `Unquoted` and other objects as their str()."""
    if isinstance(value, Unquoted):
        return str(value)
    if isinstance(value, str):
        return debug_quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _float_text(value)
    return str(value)


def _float_text(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return repr(value)


def json_value(value: object) -> object:
    """Numbers and bools stay native (upstream's record_u64/f64/bool); the rest are strings."""
    if isinstance(value, Unquoted):
        return str(value)
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # serde_json writes null for these
    return str(value)


def record_fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, object]:
    """The record's `fields` (None values omitted, as upstream skips unset Options)."""
    raw = getattr(record, "fields", None)
    fields = {k: v for k, v in raw.items() if v is not None} if isinstance(raw, Mapping) else {}
    if record.exc_info:
        fields["exception"] = formatter.formatException(record.exc_info)
    if record.stack_info:
        fields["stack"] = formatter.formatStack(record.stack_info)
    return fields


class PlainFormatter(logging.Formatter):
    """`<time>\\t<level>\\t<target>[\\t<message>\\t][<k=v ...>]` (upstream `IstioFormat`)."""

    def format(self, record: logging.LogRecord) -> str:
        head = f"{timestamp(record.created)}\t{level_word(record.levelno)}\t"
        head += target_of(record.name)
        message = record.getMessage()
        fields = record_fields(record, self)
        if not message and not fields:
            return head
        # Upstream writes the message raw; we escape line breaks so a record stays one line.
        body = message.replace("\r", "\\r").replace("\n", "\\n") + "\t" if message else ""
        body += " ".join(f"{k}={plain_value(v)}" for k, v in fields.items())
        return f"{head}\t{body}"


class JSONFormatter(logging.Formatter):
    """`{"level","time","scope","message",<fields>}` (upstream `IstioJsonFormat`).

    `process` names the emitting process (supervisor or worker) so structured consumers can
    tell the workers apart; plain lines stay byte-compatible with upstream and omit it.
    """

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "level": level_word(record.levelno),
            "time": timestamp(record.created),
            "scope": target_of(record.name),
        }
        message = record.getMessage()
        if message:
            obj["message"] = message
        if self.process:
            obj["process"] = self.process
        for key, value in record_fields(record, self).items():
            obj[key] = json_value(value)
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# Output


class LineHandler(logging.Handler):
    """Writes each record as one line with a single `os.write` on a raw fd.

    Supervisor and workers share stdout; a pipe write of at most PIPE_BUF (4 KiB on Linux) is
    atomic, so lines from different processes never interleave. No buffered stream is used:
    a buffer would split or batch lines at arbitrary points.
    """

    def __init__(self, fd: int = 1, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            write_all(self.fd, line.encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)


def write_all(fd: int, data: bytes) -> None:
    """One `os.write` for the whole line; loop only if the kernel took less (> PIPE_BUF)."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # Someone made the fd non-blocking: wait until it drains instead of dropping.
            select.select([], [fd], [], 1.0)
            continue
        view = view[written:]


# ---------------------------------------------------------------------------------------------
# Level specs


@dataclass(frozen=True, slots=True)
class Directive:
    """One spec clause: `level` (target None) or `target=level`."""

    target: str | None
    level: str

    @property
    def key(self) -> str | None:
        """Targets compare without the `ztunnel` prefix and with `::` read as `.`."""
        if self.target is None:
            return None
        return target_of(self.target.replace("::", "."))

    def text(self) -> str:
        return self.level if self.target is None else f"{self.target}={self.level}"


def parse_spec(spec: str) -> tuple[Directive, ...]:
    """Parse `info`, `access=debug,info`, `ztunnel::proxy=trace`...

    Follows upstream `admin.rs::validate_log_level`: a clause is a bare level word or contains
    `=`; the `target=level` form must also parse (non-empty target, known level).
    """
    return tuple(_parse_clause(c.strip()) for c in spec.split(","))


def _parse_clause(clause: str) -> Directive:
    if clause in LEVELS:
        return Directive(None, clause)
    target, sep, level = clause.partition("=")
    level = level.strip().lower()
    target = target.strip()
    if not sep or not target or level not in LEVELS:
        raise InvalidLevelSpec(f"level {clause} is invalid")
    return Directive(target, level)


def render_spec(directives: Iterable[Directive]) -> str:
    """Canonical spec: per target the last clause wins, in first-seen order; the default last."""
    latest: dict[str | None, Directive] = {}
    for d in directives:
        latest[d.key] = d
    default = latest.pop(None, None)
    ordered = [*latest.values(), *([default] if default is not None else [])]
    return ",".join(d.text() for d in ordered)


def loggers_for(target: str) -> tuple[str, ...]:
    """Logger names a target addresses: `x`, `ztunnel.x` and `ztunnel::x` all mean both."""
    name = target_of(target.replace("::", "."))
    if target.replace("::", ".") == "ztunnel" or not name:
        return ("ztunnel",)
    return (name, _PREFIX + name)


class LogControl:
    """The current level spec (upstream's reloadable filter) applied to stdlib loggers.

    Construction applies `default` at once. As with tracing's `Targets`, a spec without a
    bare level turns everything else off.
    """

    def __init__(self, default: str = DEFAULT_SPEC, *, process: str = "") -> None:
        self.default = render_spec(parse_spec(default))
        self.process = process
        self._spec = ""
        self._touched: set[str] = set()
        self.on_change: Callable[[str], None] | None = None  # e.g. tell the workers
        self.set(self.default)

    def current(self) -> str:
        return self._spec

    def set(self, spec: str) -> None:
        """Replace the whole spec; raises `InvalidLevelSpec` and changes nothing if invalid."""
        directives = parse_spec(spec)
        self._apply(directives)
        self._spec = render_spec(directives)
        if self.on_change is not None:
            self.on_change(self._spec)

    def append(self, spec: str) -> None:
        """Add clauses after the current ones (later clauses win), as upstream's `set_level`."""
        self.set(f"{self._spec},{spec}" if self._spec else spec)

    def reset(self) -> None:
        """Back to the spec given at start."""
        self.set(self.default)

    def _apply(self, directives: tuple[Directive, ...]) -> None:
        for name in self._touched:
            logging.getLogger(name).setLevel(logging.NOTSET)
        self._touched.clear()
        root_level = OFF
        for d in directives:
            if d.target is None:
                root_level = LEVELS[d.level]
                continue
            for name in loggers_for(d.target):
                logging.getLogger(name).setLevel(LEVELS[d.level])
                self._touched.add(name)
        logging.getLogger().setLevel(root_level)


def configure_logging(format: str, level_spec: str, process: str, *, fd: int = 1) -> LogControl:
    """Install the one stdout handler (`format` "json" or plain) and apply `level_spec`.

    Calling it again replaces the handler installed before; other handlers are left alone.
    """
    control = LogControl(level_spec, process=process)
    formatter = JSONFormatter(process) if format == "json" else PlainFormatter()
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, LineHandler)]:
        root.removeHandler(old)
    handler = LineHandler(fd)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    return control
