"""Bounds on HTTP request heads, for every route of the one port.

A request head (request line, headers, blank line) may take at most
``max_request_line`` bytes for its request line, ``max_request_head`` bytes
in all and ``MAX_HEADERS`` header lines; beyond that the connection is
answered ``414`` or ``431`` and closed, before the head is parsed.  The
front door applies :class:`HeadReader` to the first request of every
connection (the ``/ws`` upgrade included); twisted.web's channel applies it
to every request after that.  No route takes a body, and none is ever read
(``web.BoundedChannel``), so a connection's requests are heads only.

The reader never loops over bytes in Python: each read is searched,
measured and counted with ``bytes`` methods, so a bounded head costs time
in proportion to its size whatever way it is cut into reads.
"""

from __future__ import annotations

from typing import Any, NamedTuple

# header lines per request head (browsers send about 15)
MAX_HEADERS = 100

END = b"\r\n\r\n"


class Refusal(NamedTuple):
    """How a request over a bound is answered; ``label`` names the bound
    in the ``autogpt_ws_http_refused_total`` metric."""

    status: int
    phrase: str
    label: str

    def response(self) -> bytes:
        return (b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                % (self.status, self.phrase.encode("ascii")))


LINE_TOO_LONG = Refusal(414, "URI Too Long", "request_line")
HEAD_TOO_LARGE = Refusal(431, "Request Header Fields Too Large", "head_size")
TOO_MANY_HEADERS = Refusal(431, "Request Header Fields Too Large", "header_count")
OVERLOADED = Refusal(503, "Service Unavailable", "capacity")


class HeadRefused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal)
        self.refusal = refusal


def refuse(transport: Any, refusal: Refusal) -> None:
    """Answer with ``refusal`` and close, reading nothing more."""
    transport.write(refusal.response())
    transport.loseConnection()


class HeadReader:
    """Follows the request heads of one connection as its bytes arrive.

    :meth:`feed` is given each read; it says where the current head ends
    (and starts the next), or raises :class:`HeadRefused` as soon as the
    head passes a bound, whatever has not arrived yet.  Heads follow each
    other with nothing between them: no request here has a body."""

    __slots__ = ("max_line", "max_head", "size", "newlines", "line_done", "last")

    def __init__(self, max_line: int, max_head: int) -> None:
        self.max_line = max_line
        self.max_head = max_head
        self._reset()

    def _reset(self) -> None:
        self.size = 0  # bytes of the current head so far
        self.newlines = 0  # line ends among them
        self.line_done = False  # its request line has ended
        self.last = b""  # its last three bytes: an END cut by a read

    @property
    def started(self) -> bool:
        """Part of a head has arrived and its end has not."""
        return self.size > 0

    def feed(self, data: bytes, start: int = 0) -> int:
        """Take ``data[start:]``.  Returns the index in ``data`` just past
        the end of the current head (the reader then waits for the next
        head), or -1 when the head goes on past ``data``."""
        room = self.max_head - self.size
        end = -1
        if self.last:  # an END begun in the previous read
            hit = (self.last + data[start:start + 3]).find(END)
            if hit >= 0:
                end = start + hit + 4 - len(self.last)
        if end < 0:
            hit = data.find(END, start, start + room)  # an END past the bound is too late anyway
            if hit >= 0:
                end = hit + 4
        stop = len(data) if end < 0 else end
        taken = stop - start
        if not self.line_done:
            newline = data.find(b"\n", start, stop)
            line = self.size + (taken if newline < 0 else newline + 1 - start)
            if line > self.max_line:
                raise HeadRefused(LINE_TOO_LONG)
            self.line_done = newline >= 0
        if self.size + taken > self.max_head:
            raise HeadRefused(HEAD_TOO_LARGE)
        self.newlines += data.count(b"\n", start, stop)
        if self.newlines > MAX_HEADERS + 2:  # the request line's, each header's, the blank line's
            raise HeadRefused(TOO_MANY_HEADERS)
        if end >= 0:
            self._reset()
            return end
        self.size += taken
        tail = data[max(start, stop - 3):stop]
        self.last = tail if len(tail) == 3 else (self.last + tail)[-3:]
        return -1
