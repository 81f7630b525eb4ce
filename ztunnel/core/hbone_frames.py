"""Pre-scan of inbound HTTP/2 frame headers, before h2 sees the bytes: the limits h2 lacks.

h2 4.4.1 counts none of RST_STREAM, PING, SETTINGS or empty frames, checks a frame's length
only once the whole frame is buffered (a 16 MiB header costs 16 MiB of memory first), and
buffers up to 64 CONTINUATION frames of max frame size before decoding (hardening.md §1.3,
§4.2). Reading the 9-byte header of each frame as it streams past costs a few operations per
frame, so the checks below run on every chunk.

Rapid reset (CVE-2023-44487) is counted as premature resets: the peer resets a stream it
opened before we answered it. A HEADERS + RST_STREAM pair inside one read is caught here,
before h2 does any work for it; the connection core reports the other premature resets
(`count_premature_reset`). Resets of answered streams are ordinary tunnel aborts and are not
counted: a pooled connection carries thousands of them over its life.

GOAWAY frames are cut out of the byte stream and reported in `goaways`: h2 4.4.1 moves to
CLOSED on any GOAWAY and then refuses to send or receive on the streams that should survive a
graceful shutdown, so the connection core handles GOAWAY itself. Cutting needs whole frame
headers, so a chunk that ends inside a header holds those few bytes back for the next one.
"""

from __future__ import annotations

import struct

from h2.errors import ErrorCodes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

MAX_HEADER_FRAME = 16 << 10  # bytes per HEADERS / PUSH_PROMISE / CONTINUATION frame
MAX_CONTINUATIONS = 32  # CONTINUATION frames per header block
MAX_PEER_RESETS = 1000  # premature resets per connection lifetime
RESET_RATE = (100, 1.0)  # premature resets per second
CONTROL_RATE = (1000, 10.0)  # PING, SETTINGS, PRIORITY, unknown, empty DATA per 10 s

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4

_HEADER = struct.Struct(">HBBBI")  # 24-bit length as 16 + 8 bits, type, flags, stream id
_GOAWAY_BODY = struct.Struct(">II")


class FrameViolation(Exception):
    """The peer broke a limit: the connection must end with GOAWAY(error_code)."""

    def __init__(self, error_code: int, reason: str) -> None:
        super().__init__(reason)
        self.error_code = error_code
        self.reason = reason


class RateWindow:
    """Events per fixed time window; `hit` says whether this event goes over the limit."""

    __slots__ = ("count", "limit", "period", "start")

    def __init__(self, limit: int, period: float) -> None:
        self.limit = limit
        self.period = period
        self.start = float("-inf")
        self.count = 0

    def hit(self, now: float) -> bool:
        if now - self.start >= self.period:
            self.start = now
            self.count = 0
        self.count += 1
        return self.count > self.limit


class FrameScanner:
    """Walks frame boundaries across chunks; `feed` returns the bytes h2 may see."""

    def __init__(self, max_frame_size: int, *, expect_preface: bool) -> None:
        self.max_frame_size = max_frame_size
        self.goaways: list[tuple[int, int]] = []  # (last_stream_id, error_code), caller drains
        self.resets = 0  # premature resets so far
        # After `feed`: (stream id, payload start, payload end) of each frame of the returned
        # bytes when they are only whole, flag-less DATA frames (the fast path's input), else
        # None. Found on the walk the checks make anyway, so the bytes are parsed once.
        self.data_frames: list[tuple[int, int, int]] | None = None
        self.reset_in_read: set[int] = set()  # streams opened and reset within the last read
        self._opened_in_read: set[int] = set()
        self._server = expect_preface
        self._preface_seen = 0 if expect_preface else len(PREFACE)
        self._held = b""  # a partial frame header from the previous chunk
        self._skip = 0  # payload bytes of the current frame still to come
        self._goaway: bytearray | None = None  # payload of a GOAWAY being cut out
        self._in_block = False
        self._continuations = 0
        self._frames: list[tuple[int, int, int]] | None = None
        self._reset_rate = RateWindow(*RESET_RATE)
        self._control_rate = RateWindow(*CONTROL_RATE)

    def feed(self, data: bytes | bytearray | memoryview, now: float) -> bytes | memoryview:
        """Check `data`; return it minus GOAWAY frames and a trailing partial frame header."""
        if self._held:
            data = self._held + data
            self._held = b""
        if self._opened_in_read:
            self._opened_in_read.clear()
            self.reset_in_read.clear()
        buf = data if isinstance(data, bytes) else memoryview(data).cast("B")
        n = len(buf)
        frames: list[tuple[int, int, int]] | None = None if self._skip else []
        self._frames = frames
        pos = self._check_preface(buf) if self._preface_seen < len(PREFACE) else 0
        if pos:
            self._frames = None
        cuts: list[tuple[int, int]] = []
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                if self._goaway is not None:
                    self._capture_goaway(buf[pos : pos + take], cuts, pos)
                pos += take
                self._skip -= take
                continue
            if n - pos < 9:
                self._held = bytes(buf[pos:])
                n = pos
                break
            pos = self._frame_header(buf, pos, now, cuts)
        if not cuts and n == len(buf):
            self.data_frames = self._frames or None
            return buf
        self.data_frames = None  # offsets would not match the bytes returned
        return _without(memoryview(buf), n, cuts)

    def _check_preface(self, buf: bytes | memoryview) -> int:
        start = self._preface_seen
        k = min(len(PREFACE) - start, len(buf))
        if buf[:k] != PREFACE[start : start + k]:
            raise FrameViolation(ErrorCodes.PROTOCOL_ERROR, "invalid preface")
        self._preface_seen += k
        return k

    def _frame_header(
        self, buf: bytes | memoryview, pos: int, now: float, cuts: list[tuple[int, int]]
    ) -> int:
        hi, lo, ftype, flags, stream_id = _HEADER.unpack_from(buf, pos)
        length = hi << 8 | lo
        self._check(length, ftype, flags, stream_id & 0x7FFFFFFF, now)
        frames = self._frames
        if frames is not None:
            end = pos + 9 + length
            if ftype == DATA and not flags and end <= len(buf):
                frames.append((stream_id & 0x7FFFFFFF, pos + 9, end))
            else:
                self._frames = None
        if ftype == GOAWAY:
            if stream_id & 0x7FFFFFFF or length < 8:
                raise FrameViolation(ErrorCodes.PROTOCOL_ERROR, "malformed GOAWAY")
            self._goaway = bytearray()
            cuts.append((pos, pos + 9))
        self._skip = length
        return pos + 9

    def _check(self, length: int, ftype: int, flags: int, stream_id: int, now: float) -> None:
        if length > self.max_frame_size:
            raise FrameViolation(ErrorCodes.FRAME_SIZE_ERROR, "frame too large")
        if self._in_block or ftype in (HEADERS, PUSH_PROMISE):
            self._header_block(length, ftype, flags)
            if ftype == HEADERS and self._server:
                self._opened_in_read.add(stream_id)
        elif ftype == RST_STREAM:
            if stream_id in self._opened_in_read:
                self.reset_in_read.add(stream_id)
                self.count_premature_reset(now)
        elif ftype == DATA:
            if length == 0 and not flags & END_STREAM and self._control_rate.hit(now):
                raise FrameViolation(ErrorCodes.ENHANCE_YOUR_CALM, "empty DATA flood")
        elif ftype not in (WINDOW_UPDATE, GOAWAY, CONTINUATION) and self._control_rate.hit(now):
            raise FrameViolation(ErrorCodes.ENHANCE_YOUR_CALM, "control frame flood")

    def _header_block(self, length: int, ftype: int, flags: int) -> None:
        if length > MAX_HEADER_FRAME:
            raise FrameViolation(ErrorCodes.ENHANCE_YOUR_CALM, "header frame too large")
        if self._in_block:
            if ftype != CONTINUATION:
                raise FrameViolation(ErrorCodes.PROTOCOL_ERROR, "header block interrupted")
            self._continuations += 1
            if self._continuations > MAX_CONTINUATIONS:
                raise FrameViolation(ErrorCodes.ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
        else:
            self._continuations = 0
        self._in_block = not flags & END_HEADERS

    def count_premature_reset(self, now: float) -> None:
        """One more stream reset by the peer before we answered it; raises over the limits."""
        self.resets += 1
        if self.resets > MAX_PEER_RESETS:
            raise FrameViolation(ErrorCodes.ENHANCE_YOUR_CALM, "too many stream resets")
        if self._reset_rate.hit(now):
            raise FrameViolation(ErrorCodes.ENHANCE_YOUR_CALM, "stream reset flood")

    def _capture_goaway(
        self, payload: bytes | memoryview, cuts: list[tuple[int, int]], pos: int
    ) -> None:
        assert self._goaway is not None
        need = 8 - len(self._goaway)
        if need > 0:
            self._goaway += payload[:need]
        cuts.append((pos, pos + len(payload)))
        if self._skip == len(payload):  # last piece of this frame
            self.goaways.append(_GOAWAY_BODY.unpack_from(self._goaway))
            self._goaway = None


def _without(view: memoryview, end: int, cuts: list[tuple[int, int]]) -> bytes | memoryview:
    """`view[:end]` minus the `cuts` ranges (sorted, inside `[:end]`)."""
    if not cuts:
        return view[:end]
    parts = []
    pos = 0
    for start, stop in cuts:
        parts.append(view[pos:start])
        pos = stop
    parts.append(view[pos:end])
    return b"".join(parts)
