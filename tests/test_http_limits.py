"""The HTTP side of issue 14 (hardening, round two), over real loopback
sockets: bounded request heads on every route, the /ws upgrade included
(414/431, closed); request bodies never read; a deadline on every request
of a keep-alive connection; the bound on connections that are not
WebSockets; pipelined requests read only while the answers are; the bound
on bytes a client sends before its upgrade is answered; Sec-WebSocket-Version
other than 13 (426); HEAD without a warning."""

from __future__ import annotations

import base64
import socket
from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from autogpt_ws.web.heads import MAX_HEADERS, HeadReader, HeadRefused
from tests.helpers import (SilentServer, raw_connect, raw_upgrade_request, sleep, start_server, tcp_buffered, wait_for,
                           ws_client_frame)

HEARTBEAT = '{"method":"heartbeat","data":"ping","success":true}'
PONG = b'{"method":"heartbeat","data":"pong","success":true}'


class Talk(Protocol):
    """A raw TCP client: writes what it is told, keeps every byte it
    receives; ``lost`` fires when the connection is gone, ``closed_by_server``
    says whether the server closed it."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self.closed_by_server = False
        self._aborting = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.closed_by_server = not self._aborting
        self.lost.callback(None)

    def write(self, data: bytes) -> None:
        if not self.lost.called:
            self.transport.write(data)  # type: ignore[union-attr]

    def abort(self) -> Deferred[None]:
        if not self.lost.called:
            self._aborting = True
            self.transport.abortConnection()  # type: ignore[union-attr]
        return self.lost

    def status(self) -> int | None:
        if not self.received.startswith(b"HTTP/1.1 "):
            return None
        return int(self.received[9:12])


@inlineCallbacks
def talk(test: TestCase, port: int, data: bytes = b"", rcvbuf: int | None = None) -> Any:
    """A Talk connected to 127.0.0.1:port, having written ``data``; with
    ``rcvbuf``, a small receive buffer (a client meant to stop reading)."""
    proto = Talk()
    if rcvbuf is None:
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), proto)
    else:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            reactor.adoptStreamConnection(sock.fileno(), socket.AF_INET,  # type: ignore[attr-defined]
                                          Factory.forProtocol(lambda: proto))
    test.addCleanup(proto.abort)
    if data:
        proto.write(data)
    return proto


@inlineCallbacks
def answered(test: TestCase, port: int, data: bytes, timeout: float = 5.0) -> Any:
    """Send ``data`` and wait for the server to close the connection;
    fails if it has not within ``timeout`` seconds."""
    proto = yield talk(test, port, data)
    yield proto.lost.addTimeout(timeout, reactor)
    test.assertTrue(proto.closed_by_server)
    return proto


def upgrade_with(headers: dict[str, str] | None = None, path: str = "/ws") -> bytes:
    return raw_upgrade_request(path, headers=headers)


def padded(head: bytes, size: int) -> bytes:
    """``head`` (a whole request head) with an X-Pad header making it
    exactly ``size`` bytes long."""
    pad = size - len(head) - len(b"X-Pad: \r\n")
    assert pad >= 0
    return head[:-2] + b"X-Pad: " + b"a" * pad + b"\r\n\r\n"


def get(path: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    return ("\r\n".join([f"GET {path} {version}", "Host: 127.0.0.1", *headers]) + "\r\n\r\n").encode("latin-1")


class HeadReaderUnit(TestCase):
    """heads.HeadReader alone: where heads end, and each bound at its edge."""

    def test_ends_found_whatever_the_reads(self) -> None:
        stream = get("/health") + get("/ready", "X-A: 1") + get("/")
        ends = [len(get("/health")), len(get("/health")) + len(get("/ready", "X-A: 1")), len(stream)]
        for size in (1, 2, 3, 4, 5, 7, 64, len(stream)):
            reader = HeadReader(8192, 16384)
            found, offset = [], 0
            for index in range(0, len(stream), size):
                chunk = stream[index:index + size]
                start = 0
                while start < len(chunk):
                    end = reader.feed(chunk, start)
                    if end < 0:
                        break
                    found.append(offset + end)
                    start = end
                offset += len(chunk)
            self.assertEqual(found, ends, size)

    def test_bounds_at_their_edges(self) -> None:
        line = b"GET /" + b"a" * (1000 - len(b"GET / HTTP/1.1\r\n")) + b" HTTP/1.1\r\n"
        self.assertEqual(len(line), 1000)
        self.assertEqual(HeadReader(1000, 2000).feed(line + b"\r\n"), 1002)
        with self.assertRaises(HeadRefused) as refused:
            HeadReader(999, 2000).feed(line)
        self.assertEqual(refused.exception.refusal.status, 414)
        head = padded(get("/"), 2000)
        self.assertEqual(HeadReader(1000, 2000).feed(head), 2000)
        with self.assertRaises(HeadRefused) as refused:
            HeadReader(1000, 1999).feed(head)
        self.assertEqual((refused.exception.refusal.status, refused.exception.refusal.label), (431, "head_size"))
        many = get("/", *(f"X-{i}: a" for i in range(MAX_HEADERS - 1)))  # Host is one
        self.assertEqual(HeadReader(8192, 16384).feed(many), len(many))
        with self.assertRaises(HeadRefused) as refused:
            HeadReader(8192, 16384).feed(get("/", *(f"X-{i}: a" for i in range(MAX_HEADERS))))
        self.assertEqual((refused.exception.refusal.status, refused.exception.refusal.label), (431, "header_count"))

    def test_refused_before_the_end_arrives(self) -> None:
        reader = HeadReader(8192, 16384)
        self.assertEqual(reader.feed(b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 16000), -1)
        with self.assertRaises(HeadRefused):
            reader.feed(b"a" * 1000)
        with self.assertRaises(HeadRefused):
            HeadReader(8192, 16384).feed(b"GET /" + b"a" * 9000)


class HeadBounds(TestCase):
    """Item 2: every route, /ws included, bounds its request head."""

    timeout = 30

    @inlineCallbacks
    def test_upgrade_head_over_the_bound_gets_431(self) -> None:
        server = start_server(self)
        proto = yield answered(self, server.port, padded(upgrade_with(), 16385))
        self.assertEqual(proto.status(), 431)
        self.assertEqual(server.stats.http_refused["head_size"], 1)
        # at the bound: a socket
        client = yield raw_connect(server.port, headers={"X-Pad": "a" * (16384 - len(upgrade_with()) - 9)},
                                   test=self)
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)

    @inlineCallbacks
    def test_huge_upgrade_head_is_cut_off_early(self) -> None:
        """A 16 MiB head is refused after the first 16 KiB, whatever way it
        comes: not buffered, not parsed, never a 101."""
        server = start_server(self)
        proto = yield talk(self, server.port, upgrade_with()[:-2])
        for _ in range(256):  # 16 MiB in 64 KiB writes, unless the server has closed
            proto.write(b"X-Pad: " + b"a" * 65527 + b"\r\n")
        proto.write(b"\r\n")
        yield proto.lost.addTimeout(10, reactor)
        self.assertEqual(proto.status(), 431)
        self.assertEqual(server.stats.http_refused["head_size"], 1)
        self.assertEqual(len(server.factory.sockets), 0)

    @inlineCallbacks
    def test_request_line_over_8k_gets_414(self) -> None:
        server = start_server(self)
        for path in ("/ws?token=" + "a" * 8200, "/health?" + "a" * 8200):
            request = get(path, "Upgrade: websocket") if path.startswith("/ws") else get(path)
            proto = yield answered(self, server.port, request)
            self.assertEqual(proto.status(), 414, path[:10])
        # sent without its end: refused as soon as it passes the bound
        proto = yield answered(self, server.port, b"GET /ws?" + b"a" * 9000)
        self.assertEqual(proto.status(), 414)
        self.assertEqual(server.stats.http_refused["request_line"], 3)

    @inlineCallbacks
    def test_more_than_100_headers_gets_431(self) -> None:
        server = start_server(self)
        extra = {f"X-{i}": "a" for i in range(MAX_HEADERS - 5)}  # an upgrade has 5 of its own
        client = yield raw_connect(server.port, headers=extra, test=self)
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)
        proto = yield answered(self, server.port, upgrade_with({**extra, "X-Last": "a"}))
        self.assertEqual(proto.status(), 431)
        proto = yield answered(self, server.port, get("/health", *(f"X-{i}: a" for i in range(MAX_HEADERS))))
        self.assertEqual(proto.status(), 431)
        self.assertEqual(server.stats.http_refused["header_count"], 2)

    @inlineCallbacks
    def test_keep_alive_requests_are_bounded_too(self) -> None:
        server = start_server(self)
        proto = yield talk(self, server.port, get("/health"))
        yield wait_for(lambda: b'{"status":"healthy"}' in proto.received)
        proto.write(padded(get("/health"), 16385))
        yield proto.lost.addTimeout(5, reactor)
        self.assertIn(b"HTTP/1.1 431 ", proto.received)

    @inlineCallbacks
    def test_settings_move_the_bounds(self) -> None:
        server = start_server(self, max_request_line=1024, max_request_head=2048)
        proto = yield answered(self, server.port, get("/health?" + "a" * 1100))
        self.assertEqual(proto.status(), 414)
        proto = yield answered(self, server.port, padded(upgrade_with(), 2049))
        self.assertEqual(proto.status(), 431)
        client = yield raw_connect(server.port, headers={"X-Pad": "a" * (2048 - len(upgrade_with()) - 9)}, test=self)
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)


class Bodies(TestCase):
    """Item 3: no route takes a body; none is ever read or stored."""

    timeout = 30

    @inlineCallbacks
    def test_announced_body_answered_at_once_and_not_read(self) -> None:
        server = start_server(self, open_handshake_timeout=30)
        for head, status in ((b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n", 405),
                             (b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 200),
                             (b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
                              404)):
            # only the head is sent: the answer must not wait for the body
            proto = yield answered(self, server.port, head)
            self.assertEqual(proto.status(), status, head)
            self.assertNotIn(b"100 Continue", proto.received)
            self.assertIn(b"\r\nConnection: close\r\n", proto.received)
        self.assertEqual(server.stats.http_refused["body"], 3)

    @inlineCallbacks
    def test_body_bytes_are_never_parsed_as_a_request(self) -> None:
        server = start_server(self)
        smuggled = get("/metrics")
        head = b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
        proto = yield answered(self, server.port, head + smuggled)
        self.assertEqual(proto.received.count(b"HTTP/1.1 "), 1)
        self.assertEqual(proto.status(), 405)

    @inlineCallbacks
    def test_dribbled_body_does_not_hold_the_connection(self) -> None:
        server = start_server(self, open_handshake_timeout=0.5)
        proto = yield talk(self, server.port, b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(40):  # a byte every 0.05 s: never idle for the timeout
            if proto.lost.called:
                break
            proto.write(b"x")
            yield sleep(0.05)
        self.assertTrue(proto.lost.called, "a dribbled body held the connection for 2 s")
        self.assertTrue(proto.closed_by_server)


class RequestDeadline(TestCase):
    """Item 3: every request of a keep-alive connection has a deadline."""

    timeout = 30

    @inlineCallbacks
    def test_trickled_second_request_is_cut_off(self) -> None:
        server = start_server(self, open_handshake_timeout=0.5)
        proto = yield talk(self, server.port, get("/health"))
        yield wait_for(lambda: b'{"status":"healthy"}' in proto.received)
        for byte in get("/ready", "X-Pad: " + "a" * 100):
            if proto.lost.called:
                break
            proto.write(bytes([byte]))
            yield sleep(0.05)
        self.assertTrue(proto.lost.called, "a trickled keep-alive request held the connection")
        self.assertTrue(proto.closed_by_server)
        self.assertNotIn(b'{"status":"ready"}', proto.received)

    @inlineCallbacks
    def test_answered_requests_keep_the_connection(self) -> None:
        server = start_server(self, open_handshake_timeout=0.5)
        proto = yield talk(self, server.port)
        for index in range(4):  # 1.2 s in all, each request well inside the deadline
            proto.write(get("/health"))
            yield wait_for(lambda: proto.received.count(b'{"status":"healthy"}') == index + 1)
            yield sleep(0.3)
        self.assertFalse(proto.lost.called)


class HTTPConnections(TestCase):
    """Item 3: connections that are not WebSockets count toward a bound."""

    timeout = 30

    @inlineCallbacks
    def test_beyond_the_bound_503_and_closed(self) -> None:
        server = start_server(self, max_http_connections=2)
        socket = yield raw_connect(server.port, test=self)  # a WebSocket does not count
        first = yield talk(self, server.port, b"GET /he")
        yield talk(self, server.port)
        yield wait_for(lambda: server.site.http_connections == 2)
        third = yield talk(self, server.port)
        yield third.lost.addTimeout(5, reactor)
        self.assertEqual(third.status(), 503)
        self.assertEqual(server.stats.http_refused["capacity"], 1)
        # a freed place is taken again, and the socket was never affected
        yield first.abort()
        yield wait_for(lambda: server.site.http_connections == 1)
        proto = yield answered(self, server.port, get("/health", "Connection: close"))
        self.assertEqual(proto.status(), 200)
        self.assertEqual((yield socket.request(HEARTBEAT)), PONG)
        yield wait_for(lambda: server.site.http_connections == 1)

    @inlineCallbacks
    def test_counts_return_to_zero(self) -> None:
        server = start_server(self, max_http_connections=100)
        for data in (get("/health", "Connection: close"), padded(get("/"), 20000), b"GET /x", b"",
                     # an upgrade on a keep-alive connection: twisted.web's /ws takes it
                     get("/health") + upgrade_with(), b"HEAD /ws HTTP/1.1\r\nHost: x\r\n\r\n"):
            proto = yield talk(self, server.port, data)
            if data.endswith(b"close\r\n\r\n") or len(data) > 16384:
                yield proto.lost
            elif data.endswith(b"Version: 13\r\n\r\n"):
                yield wait_for(lambda: b"HTTP/1.1 101 " in proto.received)
                yield proto.abort()
            else:
                yield sleep(0.05)
                yield proto.abort()
        client = yield raw_connect(server.port, test=self)
        yield client.abort()
        yield wait_for(lambda: server.site.http_connections == 0 and not server.factory.sockets)


class Pipelining(TestCase):
    """Pipelined requests are parsed only while the client reads the
    answers: a read full of requests does not pile up answers."""

    timeout = 60

    @inlineCallbacks
    def test_answers_not_read_are_not_piled_up(self) -> None:
        server = start_server(self)
        proto = yield talk(self, server.port, rcvbuf=4096)
        proto.transport.pauseProducing()  # type: ignore[union-attr]  # stop reading
        count = 20000
        proto.write(get("/health") * count)  # about 3.5 MB of answers
        yield wait_for(lambda: _channels(server))
        yield sleep(0.5)
        (channel,) = _channels(server)
        held = tcp_buffered(channel.transport)
        self.assertLess(held, 2 * 65536, "answers piled up for a client that does not read")
        proto.transport.resumeProducing()  # type: ignore[union-attr]
        yield wait_for(lambda: proto.received.count(b'{"status":"healthy"}') == count, timeout=20)
        self.assertEqual(proto.received.count(b"HTTP/1.1 200 OK"), count)


    @inlineCallbacks
    def _stuck(self, server: Any, count: int) -> Any:
        """A keep-alive connection that pipelined ``count`` GET /health and
        reads none of the answers, once the server holds some of them; the
        server's side of it sends through a small buffer, so that its
        answers back up after a few hundred."""
        proto = yield talk(self, server.port, rcvbuf=4096)
        proto.transport.pauseProducing()  # type: ignore[union-attr]  # stop reading
        port = proto.transport.getHost().port  # type: ignore[union-attr]
        yield wait_for(lambda: _accepted(port))
        _accepted(port)[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        proto.write(get("/health") * count)
        yield wait_for(lambda: _channels(server) and _channels(server)[0]._held)
        (channel,) = _channels(server)
        return proto, channel

    @inlineCallbacks
    def test_requests_held_for_a_client_that_does_not_read_are_bounded(self) -> None:
        """Once answers back up, the server stops reading: it holds at most
        the rest of one read, not every request the client goes on sending."""
        server = start_server(self)
        count = 20000  # 780 KB of requests
        proto, channel = yield self._stuck(server, count)
        yield sleep(0.5)  # what the client can send meanwhile
        self.assertLessEqual(len(channel._held), server.site.max_held)
        other = yield answered(self, server.port, get("/health", "Connection: close"))
        self.assertEqual(other.status(), 200)
        proto.transport.resumeProducing()  # type: ignore[union-attr]
        yield wait_for(lambda: proto.received.count(b'{"status":"healthy"}') == count, timeout=20)
        self.assertFalse(proto.lost.called)

    @inlineCallbacks
    def test_held_past_the_bound_aborts(self) -> None:
        """Bytes that come all the same while the server holds (a TLS layer
        delivers what one read decrypted) are bounded too."""
        server = start_server(self)
        proto, channel = yield self._stuck(server, 20000)
        channel.dataReceived(get("/health") * (server.site.max_held // len(get("/health")) + 1))
        yield proto.lost.addTimeout(5, reactor)
        self.assertTrue(proto.closed_by_server)


class KeepAliveUpgrade(TestCase):
    """A /ws upgrade on a keep-alive connection, twisted.web's: the bytes
    after its head in the same read are the WebSocket's."""

    @inlineCallbacks
    def test_frame_in_the_same_read_as_the_upgrade(self) -> None:
        server = start_server(self)
        frame = ws_client_frame(HEARTBEAT.encode())
        proto = yield talk(self, server.port, get("/health") + upgrade_with() + frame)
        yield wait_for(lambda: PONG in proto.received)
        self.assertIn(b'{"status":"healthy"}', proto.received)
        self.assertIn(b"HTTP/1.1 101 ", proto.received)
        self.assertEqual(len(server.factory.sockets), 1)


def _accepted(port: int) -> list[Any]:
    """The server's TCP transport of the client connection from ``port``."""
    return [selectable for selectable in set(reactor.getReaders()) | set(reactor.getWriters())  # type: ignore[attr-defined]
            if isinstance(selectable, tcp.Server) and selectable.getPeer().port == port]


def _channels(server: Any) -> list[Any]:
    """The server's open HTTP channels (found through the reactor's readers
    and writers: the site keeps no list)."""
    found = []
    for selectable in set(reactor.getReaders()) | set(reactor.getWriters()):  # type: ignore[attr-defined]
        protocol = getattr(selectable, "protocol", None)
        channel = getattr(protocol, "_channel", None)
        if isinstance(channel, HTTPChannel) and channel.site is server.site:
            found.append(channel)
    return found


class EarlyData(TestCase):
    """Bytes a client sends before its upgrade is answered (while a key
    set is being fetched) are bounded."""

    timeout = 30

    @inlineCallbacks
    def test_flood_before_the_answer_aborts(self) -> None:
        jwks = SilentServer(self)  # the key-set fetch hangs
        server = start_server(self, enable_auth=True, jwt_jwks_url=f"http://127.0.0.1:{jwks.port}/jwks",
                              jwt_jwks_timeout=2, max_inbound_frame=1024, open_handshake_timeout=20)
        # verifying it waits for the key set: an ES256 header with an unknown kid
        header = base64.urlsafe_b64encode(b'{"alg":"ES256","kid":"k1","typ":"JWT"}').rstrip(b"=").decode()
        path = f"/ws?token={header}.e30.c2ln"
        proto = yield talk(self, server.port, raw_upgrade_request(path))
        yield wait_for(lambda: len(server.factory.sockets) == 1)
        for _ in range(64):  # 4 MiB
            proto.write(b"\x81" * 65536)
        yield proto.lost.addTimeout(1.5, reactor)  # before the fetch gives up
        self.assertTrue(proto.closed_by_server)
        self.assertEqual(proto.received, b"")
        yield wait_for(lambda: server.verifier._pending is None, timeout=10)  # the fetch times out


class HeldKeySet(Resource):
    """A key-set URL that answers only when told to."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.waiting: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.waiting.append(request)
        return NOT_DONE_YET

    def release(self) -> None:
        for request in self.waiting:
            request.setHeader(b"Content-Type", b"application/json")
            request.write(self.body)
            request.finish()
        self.waiting = []


class GoneWhileVerifying(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_client_gone_before_its_token_is_verified_is_never_opened(self) -> None:
        from tests.test_auth import jwks, keypair

        pair = keypair("ec")
        page = HeldKeySet(jwks(pair))
        site = Site(page)
        site.noisy = False
        listening = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        server = start_server(self, enable_auth=True, jwt_jwks_url=f"http://127.0.0.1:{listening.getHost().port}/k",
                              jwt_jwks_timeout=10)
        yield wait_for(lambda: page.waiting)  # the fetch at startup, held
        path = "/ws?token=" + pair.token(sub="gone")
        proto = yield talk(self, server.port, raw_upgrade_request(path))
        yield wait_for(lambda: len(server.factory.sockets) == 1)
        yield proto.abort()
        yield wait_for(lambda: not server.factory.sockets)
        page.release()
        yield sleep(0.2)
        self.assertEqual((server.stats.open_sockets, server.hub.user_sockets("gone")), (0, 0))
        client = yield raw_connect(server.port, path=path, test=self)  # the key set is known now
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)
        self.assertEqual(server.hub.user_sockets("gone"), 1)


class Versions(TestCase):
    """Item 11: Sec-WebSocket-Version other than 13 gets 426 with 13."""

    @inlineCallbacks
    def test_version_8_gets_426(self) -> None:
        server = start_server(self)
        for version in ("8", "12"):
            request = raw_upgrade_request("/ws").replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: " +
                                                          version.encode())
            proto = yield answered(self, server.port, request)
            self.assertEqual(proto.status(), 426, version)
            self.assertIn(b"\r\nSec-WebSocket-Version: 13\r\n", proto.received)
        self.assertEqual(len(server.factory.sockets), 0)
        client = yield raw_connect(server.port, test=self)
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)


class Head(TestCase):
    """Item 9: HEAD /health answers the GET's headers, logs nothing."""

    @inlineCallbacks
    def test_head_logs_no_warning(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        server = start_server(self)
        proto = yield answered(self, server.port, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(proto.status(), 200)
        head, _, body = proto.received.partition(b"\r\n\r\n")
        self.assertEqual(body, b"")
        self.assertIn(b"\r\nContent-Length: 20", head)
        self.assertIn(b"\r\nContent-Type: application/json", head)
        noisy = [formatEvent(e) for e in events if e.get("log_level") is not None
                 and e["log_level"].name in ("info", "warn", "error", "critical")
                 and "HEAD" in formatEvent(e)]
        self.assertEqual(noisy, [])
