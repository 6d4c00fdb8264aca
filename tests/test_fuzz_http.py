"""Fuzzing the HTTP side (issue 14): random request heads, ``/ws``
upgrades among them, against a real listening server.

- :class:`ReaderModel`: ``heads.HeadReader`` against a plain model of the
  bounds (the head so far, searched whole at every read), on random
  streams of heads cut into random reads: the same ends, and the same
  refusal at the same read.
- :class:`ServerFuzz`: a real server process (``python ws.py``); hypothesis
  drives random heads (methods, paths, versions, headers of random bytes,
  sizes on both sides of each bound, bodies announced, heads left
  unfinished) cut into random writes.  Every answer is a well-formed
  status line: 414/431 exactly when the model says a bound is passed,
  else an expected status, never a 5xx but 501/505.  The server has only
  16 places for connections that are not WebSockets, so one never given
  back would soon show as a 503.  Afterwards /health answers 200, a
  WebSocket works, and the process's peak RSS grew by less than 2 MiB
  (the largest head sent; it was buffered whole before the bounds).
- :class:`MemoryPerConnection`: 200 connections at once each sending
  a head (half stop just under the bound and stay open, half try to send
  256 KiB); the process's RSS grows by less than ``max_request_head`` +
  16 KiB per connection.
"""

from __future__ import annotations

import base64
import socket
import time
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial.unittest import TestCase

from autogpt_ws.web.heads import MAX_HEADERS, HeadReader, HeadRefused
from tests.helpers import free_port, ws_client_frame
from tests.test_runners import Process, clean_env, ws_py

END = b"\r\n\r\n"
MAX_LINE = 8192
MAX_HEAD = 16384
HEARTBEAT = b'{"method":"heartbeat","data":"ping","success":true}'
PONG = b'{"method":"heartbeat","data":"pong","success":true}'


def model(chunks: list[bytes], max_line: int, max_head: int) -> tuple[list[int], tuple[int, str] | None]:
    """The ends of the heads in the stream ``chunks`` make, and the refusal
    (index of the read, label), from the whole head so far at each read."""
    ends: list[int] = []
    offset = 0  # stream offset of the current head
    buffer = b""
    for index, chunk in enumerate(chunks):
        buffer += chunk
        while True:
            end = buffer.find(END)
            head = buffer if end < 0 else buffer[:end + 4]
            newline = head.find(b"\n")
            if (newline + 1 if newline >= 0 else len(head)) > max_line:
                return ends, (index, "request_line")
            if len(head) > max_head:
                return ends, (index, "head_size")
            if head.count(b"\n") > MAX_HEADERS + 2:
                return ends, (index, "header_count")
            if end < 0:
                break
            offset += end + 4
            ends.append(offset)
            buffer = buffer[end + 4:]
    return ends, None


def reader_result(chunks: list[bytes], max_line: int, max_head: int) -> tuple[list[int], tuple[int, str] | None]:
    reader = HeadReader(max_line, max_head)
    ends: list[int] = []
    offset = 0
    for index, chunk in enumerate(chunks):
        start = 0
        while start < len(chunk):
            try:
                end = reader.feed(chunk, start)
            except HeadRefused as refused:
                return ends, (index, refused.refusal.label)
            if end < 0:
                break
            ends.append(offset + end)
            start = end
        offset += len(chunk)
    return ends, None


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` in reads of the given sizes (the last takes the rest)."""
    chunks, start = [], 0
    for size in sizes:
        if start >= len(data):
            break
        chunks.append(data[start:start + size])
        start += size
    if start < len(data):
        chunks.append(data[start:])
    return chunks


# -- strategies -------------------------------------------------------------------

text_bytes = st.binary(max_size=24) | st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00", b"\x1b[2J", b"\xff\xfe", b":"])
methods = st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"BREW", b"get"]) | text_bytes
paths = st.sampled_from([b"/ws", b"/ws?token=x", b"/ws?token=", b"/health", b"/ready", b"/metrics", b"/", b"/nope",
                         b"*", b"/ws/x", b"http://h/ws"]) | text_bytes
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"", b"HTTP/1.1 extra"]) | text_bytes
key = base64.b64encode(b"0123456789abcdef")
known_headers = st.sampled_from([
    b"Host: 127.0.0.1", b"Upgrade: websocket", b"Connection: Upgrade", b"Connection: close",
    b"Sec-WebSocket-Key: " + key, b"Sec-WebSocket-Key: bad", b"Sec-WebSocket-Version: 13",
    b"Sec-WebSocket-Version: 8", b"Sec-WebSocket-Version: x", b"Sec-WebSocket-Extensions: permessage-deflate",
    b"Origin: null", b"Content-Length: 5", b"Content-Length: 300000000", b"Content-Length: -1",
    b"Transfer-Encoding: chunked", b"Expect: 100-continue", b"Access-Control-Request-Method: GET",
])
headers = st.lists(known_headers | st.builds(lambda n, v: n + b": " + v, text_bytes, text_bytes) | text_bytes,
                   max_size=12)
# sizes on both sides of each bound
# (half of the time none)
line_pads = st.just(0) | st.sampled_from([100, 8100, 8170, 8180, 8200, 9000, 70000])
head_pads = st.just(0) | st.sampled_from([1000, 16000, 16300, 16350, 16400, 20000, 300000, 2 * 1024 * 1024])
header_counts = st.just(0) | st.sampled_from([50, 94, 95, 96, 100, 150, 2000])
endings = st.sampled_from(["end", "end", "end", "body", "open"])
splits = st.lists(st.integers(1, 70000), max_size=6)


UPGRADE = [b"Host: 127.0.0.1", b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Key: " + key,
           b"Sec-WebSocket-Version: 13"]


@st.composite
def requests(draw: Any) -> tuple[bytes, str]:
    """A request head and how it ends: a well-formed upgrade or GET, or
    random parts, then grown on some side of each bound."""
    kind = draw(st.sampled_from(["upgrade", "upgrade", "get", "random"]))
    if kind == "upgrade":
        line, lines = b"GET " + draw(st.sampled_from([b"/ws", b"/ws?token=x", b"/ws?a=1&token=y"])) + b" HTTP/1.1", \
            list(UPGRADE)
    elif kind == "get":
        line, lines = b"GET " + draw(st.sampled_from([b"/health", b"/ready", b"/", b"/nope"])) + b" HTTP/1.1", \
            [b"Host: 127.0.0.1"]
    else:
        line, lines = draw(methods) + b" " + draw(paths) + b" " + draw(versions), []
    if draw(st.booleans()):
        line = line.replace(b" HTTP", b"?" + b"p" * draw(line_pads) + b" HTTP", 1) if b" HTTP" in line \
            else line + b"p" * draw(line_pads)
    lines = [line, *lines, *draw(headers if kind == "random" else st.lists(known_headers, max_size=3))]
    lines += [b"X-%d: a" % index for index in range(draw(header_counts))]
    pad = draw(head_pads)
    if pad:
        lines.append(b"X-Pad: " + b"a" * pad)
    ending = draw(endings)
    data = b"\r\n".join(lines) + (b"\r\n" if ending == "open" else END)
    if ending == "body":
        data += b"hello" + draw(st.binary(max_size=64))
    return data, ending


class ReaderModel(TestCase):
    @settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(requests(), min_size=1, max_size=3), splits,
           st.sampled_from([(8192, 16384), (64, 256), (1000, 1000)]))
    def test_reader_matches_the_model(self, stream: list[tuple[bytes, str]], sizes: list[int],
                                      bounds: tuple[int, int]) -> None:
        data = b"".join(request for request, _ in stream)
        chunks = cut(data, sizes)
        self.assertEqual(reader_result(chunks, *bounds), model(chunks, *bounds))


# -- a real server -----------------------------------------------------------------


def rss(pid: int, field: str = "VmRSS") -> int:
    """Bytes of the process's resident set (VmRSS), or its peak (VmHWM)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


def exchange(port: int, chunks: list[bytes], wait: float) -> bytes:
    """Write ``chunks`` and read until the server closes, a whole response
    head has come, or ``wait`` seconds pass; what came back."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # refused: the server closed while we were still writing
        sock.settimeout(wait)
        deadline = time.monotonic() + wait
        try:
            while END not in received and time.monotonic() < deadline:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        except OSError:
            pass  # timeout, or reset after a refusal
    return received


def websocket_heartbeat(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        data = b""
        while END not in data:
            data += sock.recv(4096)
        head, _, rest = data.partition(END)
        assert head.startswith(b"HTTP/1.1 101"), head
        sock.sendall(ws_client_frame(HEARTBEAT))
        while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7F):
            rest += sock.recv(4096)
        return rest[2:2 + (rest[1] & 0x7F)]


def health(port: int) -> bytes:
    return exchange(port, [b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"], 5)


# statuses a head within the bounds may get: 101 an upgrade, 200 a route,
# 400 Autobahn or twisted.web refusing it, 403/404/405 routes, 426 a
# version other than 13, 501 an unknown method, 505 an HTTP version the
# upgrade does not speak
ALLOWED = {101, 200, 400, 403, 404, 405, 426, 501, 505}
REFUSED = {"request_line": 414, "head_size": 431, "header_count": 431}


def serve(test: TestCase, **settings: str) -> tuple[Process, int]:
    port = free_port()
    env = clean_env(**{"WS_OPEN_HANDSHAKE_TIMEOUT": "2", "LOG_LEVEL": "error", **settings})
    proc = Process(test, ws_py("--host", "127.0.0.1", "--port", str(port)), env=env)
    proc.wait_healthy(port)
    return proc, port


class ServerFuzz(TestCase):
    timeout = 600

    def test_random_heads(self) -> None:
        # few places for connections that are not WebSockets: one a
        # connection never gave back would soon show as 503s
        proc, port = serve(self, WS_MAX_HTTP_CONNECTIONS="16")
        pid = proc.popen.pid
        for _ in range(20):  # warm up every path once: memory growth after this is the fuzz's
            health(port)
            websocket_heartbeat(port)
        peak = rss(pid, "VmHWM")
        answered: dict[int, int] = {}

        @settings(max_examples=500, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(requests(), splits)
        def run(request: tuple[bytes, str], sizes: list[int]) -> None:
            data, ending = request
            ends, refusal = model([data], MAX_LINE, MAX_HEAD)
            if ends:
                refusal = None  # a later head's: the first answer is the first head's
            expected = bool(ends) or refusal is not None
            received = exchange(port, cut(data, sizes), 5 if expected else 0.3)
            if not received:
                assert not expected, (data[:200], ending, refusal)
                return
            status_line = received.split(b"\r\n", 1)[0]
            # twisted.web answers an HTTP/1.0 request in HTTP/1.0
            assert received.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) and status_line[9:12].isdigit(), received[:200]
            assert not any(byte < 0x20 for byte in status_line), status_line
            status = int(status_line[9:12])
            answered[status] = answered.get(status, 0) + 1
            if refusal is not None:
                assert status == REFUSED[refusal[1]], (status, refusal, data[:200])
            else:
                assert status in ALLOWED, (status, data[:300])

        run()
        self.assertEqual(proc.popen.poll(), None, proc.stderr)
        self.assertIn(b'{"status":"healthy"}', health(port))
        self.assertEqual(websocket_heartbeat(port), PONG)
        growth = rss(pid, "VmHWM") - peak
        # one 2 MiB head buffered whole (as before the bounds) would cost more
        self.assertLess(growth, 2 * 1024 * 1024, f"peak RSS grew by {growth} bytes; answers {answered}")
        self.assertGreater(answered.get(431, 0), 10, answered)
        self.assertGreater(answered.get(414, 0), 3, answered)


class MemoryPerConnection(TestCase):
    timeout = 120

    def test_heads_cost_at_most_the_bound_per_connection(self) -> None:
        proc, port = serve(self, WS_OPEN_HANDSHAKE_TIMEOUT="30")
        pid = proc.popen.pid
        for _ in range(20):
            health(port)
            websocket_heartbeat(port)
        count = 200
        before = rss(pid)
        sockets = []
        try:
            for index in range(count):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sockets.append(sock)
                sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ")
                # half stop just under the bound, in small writes, and wait;
                # half try to send 256 KiB of head
                size = MAX_HEAD - 200 if index % 2 else 256 * 1024
                for offset in range(0, size, 4096):
                    try:
                        sock.sendall(b"a" * min(4096, size - offset))
                    except OSError:
                        break
            time.sleep(1.0)
            grown = rss(pid) - before
            self.assertEqual(proc.popen.poll(), None)
            self.assertIn(b'{"status":"healthy"}', health(port))
        finally:
            for sock in sockets:
                sock.close()
        per_connection = grown / count
        self.assertLess(per_connection, MAX_HEAD + 16 * 1024,
                        f"{per_connection:.0f} bytes per connection holding a head")
