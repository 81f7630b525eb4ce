"""Log line formats, level specs and the one-write-per-line handler (ztunnel.telemetry)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator

import pytest

from ztunnel.telemetry import (
    TRACE,
    InvalidLevelSpec,
    JSONFormatter,
    LineHandler,
    LogControl,
    PlainFormatter,
    Unquoted,
    configure_logging,
    debug_quote,
    loggers_for,
    parse_spec,
    render_spec,
)

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
TOUCHED = ("access", "ztunnel.access", "proxy", "ztunnel.proxy", "ztunnel", "dns", "ztunnel.dns")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in TOUCHED:
        logging.getLogger(name).setLevel(logging.NOTSET)


def make_record(
    name: str = "access",
    level: int = logging.INFO,
    msg: str = "connection complete",
    fields: dict[str, object] | None = None,
    args: tuple[object, ...] = (),
) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    if fields is not None:
        record.fields = fields
    return record


# -- plain format ------------------------------------------------------------------------------


def test_plain_line_layout_matches_upstream() -> None:
    fields: dict[str, object] = {
        "src.addr": Unquoted("10.0.0.1:1234"),
        "src.workload": "client",
        "bytes_sent": 11,
        "duration": Unquoted("5ms"),
    }
    line = PlainFormatter().format(make_record(fields=fields))
    assert re.fullmatch(
        TS + r'\tinfo\taccess\tconnection complete\tsrc.addr=10.0.0.1:1234 src.workload="client" '
        r"bytes_sent=11 duration=5ms",
        line,
    ), line


def test_plain_message_without_fields_keeps_upstream_trailing_tab() -> None:
    line = PlainFormatter().format(make_record(name="ztunnel.supervisor.app", msg="started"))
    assert line.endswith("\tinfo\tsupervisor.app\tstarted\t")


def test_plain_fields_without_message() -> None:
    record = make_record(name="dns", level=logging.DEBUG, msg="", fields={"query": "A"})
    assert PlainFormatter().format(record).endswith('\tdebug\tdns\tquery="A"')


def test_plain_bare_record_has_no_trailing_separator() -> None:
    assert PlainFormatter().format(make_record(msg="")).endswith("\tinfo\taccess")


def test_plain_value_kinds() -> None:
    fields: dict[str, object] = {"t": True, "f": 1.5, "n": None, "o": 7, "s": 'a"b'}
    line = PlainFormatter().format(make_record(msg="m", fields=fields))
    assert line.endswith('\tm\tt=true f=1.5 o=7 s="a\\"b"')


def test_lazy_percent_arguments_are_applied() -> None:
    record = make_record(msg="new log filter is %s", args=("debug",))
    assert "\tnew log filter is debug\t" in PlainFormatter().format(record)


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("plain", '"plain"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\nbreak\ttab\r", '"line\\nbreak\\ttab\\r"'),
        ("nul\0", '"nul\\0"'),
        ("bell\x07", '"bell\\u{7}"'),
        ("it's é", '"it\'s é"'),
    ],
)
def test_debug_quote_matches_rust_str_debug(text: str, quoted: str) -> None:
    assert debug_quote(text) == quoted


@pytest.mark.parametrize(
    ("level", "word"),
    [
        (logging.CRITICAL, "error"),
        (logging.ERROR, "error"),
        (logging.WARNING, "warn"),
        (logging.INFO, "info"),
        (logging.DEBUG, "debug"),
        (TRACE, "trace"),
    ],
)
def test_level_words_are_tracing_levels(level: int, word: str) -> None:
    assert PlainFormatter().format(make_record(level=level)).split("\t")[1] == word


def test_multiline_message_and_exception_stay_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "a\nb", (), None)
        record.exc_info = sys.exc_info()
    line = PlainFormatter().format(record)
    assert "\n" not in line
    assert "\ta\\nb\t" in line
    assert 'exception="Traceback' in line and "ValueError: boom" in line


# -- JSON format -------------------------------------------------------------------------------


def test_json_fields_are_natively_typed() -> None:
    fields: dict[str, object] = {
        "src.addr": Unquoted("10.0.0.1:1234"),
        "bytes_sent": 11,
        "ratio": 0.5,
        "ok": False,
        "src.identity": "spiffe://cluster.local/ns/default/sa/client",
        "skipped": None,
        "nan": float("nan"),
    }
    obj = json.loads(JSONFormatter().format(make_record(fields=fields)))
    assert list(obj)[:4] == ["level", "time", "scope", "message"]
    assert obj["level"] == "info"
    assert re.fullmatch(TS, obj["time"])
    assert obj["scope"] == "access"
    assert obj["message"] == "connection complete"
    assert obj["src.addr"] == "10.0.0.1:1234"
    assert obj["bytes_sent"] == 11 and obj["ratio"] == 0.5 and obj["ok"] is False
    assert obj["src.identity"] == "spiffe://cluster.local/ns/default/sa/client"
    assert "skipped" not in obj
    assert obj["nan"] is None


def test_json_names_the_process_and_strips_the_package_prefix() -> None:
    line = JSONFormatter("worker3").format(make_record(name="ztunnel.supervisor.xds"))
    obj = json.loads(line)
    assert obj["scope"] == "supervisor.xds"
    assert obj["process"] == "worker3"
    assert "\n" not in line


def test_json_without_message_has_no_message_key() -> None:
    obj = json.loads(JSONFormatter().format(make_record(msg="", fields={"query": "a"})))
    assert "message" not in obj and obj["query"] == "a"


# -- level specs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    ["info", "off", "trace", "access=debug,info", "ztunnel::proxy=trace", "a=DEBUG", "x = warn"],
)
def test_valid_specs_parse(spec: str) -> None:
    assert parse_spec(spec)


@pytest.mark.parametrize(
    "spec",
    ["", "INFO", "verbose", "access:debug", "access", "=debug", "access=loud", "info,"],
)
def test_invalid_specs_are_rejected(spec: str) -> None:
    with pytest.raises(InvalidLevelSpec):
        parse_spec(spec)


@pytest.mark.parametrize(
    ("spec", "rendered"),
    [
        ("info", "info"),
        ("info,access=debug", "access=debug,info"),
        ("access=off,info,debug", "access=off,debug"),
        ("access=debug,dns=info,ztunnel::access=trace", "ztunnel::access=trace,dns=info"),
    ],
)
def test_render_keeps_the_last_clause_per_target(spec: str, rendered: str) -> None:
    assert render_spec(parse_spec(spec)) == rendered


def test_targets_address_both_logger_spellings() -> None:
    assert loggers_for("access") == ("access", "ztunnel.access")
    assert loggers_for("ztunnel::proxy") == ("proxy", "ztunnel.proxy")
    assert loggers_for("ztunnel.proxy") == ("proxy", "ztunnel.proxy")
    assert loggers_for("ztunnel") == ("ztunnel",)


def test_log_control_applies_levels_to_loggers() -> None:
    control = LogControl("info")
    control.append("access=trace")
    assert control.current() == "access=trace,info"
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("access").level == TRACE
    assert logging.getLogger("ztunnel.access").level == TRACE
    assert logging.getLogger("access").isEnabledFor(TRACE)


def test_log_control_reset_forgets_targeted_levels() -> None:
    control = LogControl("access=off,info")
    control.append("access=debug,proxy=warn,debug")
    assert control.current() == "access=debug,proxy=warn,debug"
    control.reset()
    assert control.current() == "access=off,info"
    assert logging.getLogger("proxy").level == logging.NOTSET
    assert not logging.getLogger("access").isEnabledFor(logging.ERROR)
    assert logging.getLogger("ztunnel.dns").getEffectiveLevel() == logging.INFO


def test_spec_without_default_turns_other_targets_off() -> None:
    LogControl("access=info")
    assert logging.getLogger("access").isEnabledFor(logging.INFO)
    assert not logging.getLogger("ztunnel.dns").isEnabledFor(logging.CRITICAL)


def test_invalid_set_changes_nothing() -> None:
    control = LogControl("info")
    with pytest.raises(InvalidLevelSpec):
        control.set("access=debug,bogus")
    assert control.current() == "info"
    assert logging.getLogger("access").level == logging.NOTSET


# -- output ------------------------------------------------------------------------------------


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    os.close(r)
    os.close(w)


def drain(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(chunks)
        chunks.append(chunk)


def test_each_record_is_one_write_of_one_line(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    r, w = pipe
    writes: list[bytes] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes | memoryview) -> int:
        if fd == w:
            writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    configure_logging("plain", "info", "supervisor", fd=w)
    log = logging.getLogger("access")
    log.info("connection complete", extra={"fields": {"bytes_sent": 1}})
    log.debug("filtered out")
    log.warning("connection failed", extra={"fields": {"error": "x" * 3000}})
    assert len(writes) == 2
    assert all(chunk.endswith(b"\n") and chunk.count(b"\n") == 1 for chunk in writes)
    assert drain(r) == b"".join(writes)


def test_json_output_lines_parse(pipe: tuple[int, int]) -> None:
    r, w = pipe
    configure_logging("json", "debug", "worker0", fd=w)
    logging.getLogger("ztunnel.proxy").debug("hello %d", 5, extra={"fields": {"n": 1}})
    (line,) = drain(r).splitlines()
    assert json.loads(line) | {"time": "t"} == {
        "level": "debug",
        "time": "t",
        "scope": "proxy",
        "message": "hello 5",
        "process": "worker0",
        "n": 1,
    }


def test_reconfiguring_replaces_the_previous_handler(pipe: tuple[int, int]) -> None:
    _, w = pipe
    configure_logging("plain", "info", "supervisor", fd=w)
    configure_logging("json", "info", "supervisor", fd=w)
    ours = [h for h in logging.getLogger().handlers if isinstance(h, LineHandler)]
    assert len(ours) == 1 and isinstance(ours[0].formatter, JSONFormatter)


def test_long_lines_are_written_whole(pipe: tuple[int, int]) -> None:
    r, w = pipe
    handler = LineHandler(w)
    handler.setFormatter(PlainFormatter())
    handler.emit(make_record(msg="y" * 20_000))
    (line,) = drain(r).splitlines()
    assert line.endswith(b"y" * 20_000 + b"\t")
