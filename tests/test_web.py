"""The HTTP routes of PROTOCOL.md section 1, over a real loopback port:
/, /health, /ready, /metrics, 404, CORS and its preflight, the access log."""

from __future__ import annotations

import io
import re
from typing import Any

import txaio
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from autogpt_ws.running import logs
from tests.helpers import connect, raw_connect, start_server, wait_for

HEALTHY = b'{"status":"healthy"}'


# -- HTTP/1.1 over a real socket: any method, keep-alive -----------------------
# (also used by test_shutdown and test_runners)


class HTTPResponse:
    """One parsed response: status, lower-case header names (repeated
    headers joined with ", "), body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"HTTPResponse({self.status}, {self.headers!r}, {self.body!r})"


class HTTPConnection(Protocol):
    """A hand-written HTTP/1.1 client connection: requests are sent one at
    a time and their responses parsed by Content-Length, so one connection
    can carry several requests (keep-alive).  ``lost`` fires when the TCP
    connection is gone."""

    def __init__(self) -> None:
        self.connected_d: Deferred[HTTPConnection] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self._buffer = b""
        self._pending: tuple[bytes, Deferred[HTTPResponse]] | None = None

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes = b"", timeout: float = 5.0) -> Deferred[HTTPResponse]:
        if self._pending is not None:
            raise RuntimeError("one request at a time")
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        done: Deferred[HTTPResponse] = Deferred()
        done.addTimeout(timeout, reactor)
        self._pending = (method.encode("ascii"), done)
        assert self.transport is not None
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return done

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        self._parse(closed=False)

    def _parse(self, closed: bool) -> None:
        if self._pending is None:
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        status_line, *header_lines = self._buffer[:end].decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
        status = int(status_line.split(" ")[1])
        method, done = self._pending
        start = end + 4
        if method == b"HEAD" or status in (204, 304):
            length = 0
        elif "content-length" in headers:
            length = int(headers["content-length"])
        elif closed:
            length = len(self._buffer) - start
        else:
            return  # the body runs to the close of the connection
        if len(self._buffer) - start < length:
            return
        body, self._buffer = self._buffer[start:start + length], self._buffer[start + length:]
        self._pending = None
        done.callback(HTTPResponse(status, headers, body))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._parse(closed=True)
        if self._pending is not None:
            _, done = self._pending
            self._pending = None
            done.errback(ConnectionError("connection closed before a full response"))
        self.lost.callback(None)

    def close(self) -> Deferred[None]:
        """Drop the connection; fires when it is gone."""
        if not self.lost.called and self.transport is not None:
            self.transport.loseConnection()
        return self.lost


def http_connect(port: int, test: TestCase | None = None) -> Deferred[HTTPConnection]:
    """An HTTPConnection to 127.0.0.1:port (closed at cleanup with ``test``)."""
    conn = HTTPConnection()
    if test is not None:
        test.addCleanup(conn.close)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    d = connectProtocol(endpoint, conn)
    d.addCallback(lambda _: conn.connected_d)
    return d


@inlineCallbacks
def http_request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
                 body: bytes = b"") -> Any:
    """One request with ``Connection: close``; fires with the HTTPResponse
    once the server has closed the connection (no socket left behind)."""
    conn = yield http_connect(port)
    response = yield conn.request(method, path, {**(headers or {}), "Connection": "close"}, body)
    yield conn.lost
    return response


class Routes(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_root_and_health(self) -> Any:
        server = start_server(self)
        for path in ("/", "/health", "/health?token=abc"):
            response = yield http_request(server.port, "GET", path)
            self.assertEqual(response.status, 200, path)
            self.assertEqual(response.headers["content-type"], "application/json", path)
            self.assertEqual(response.body, HEALTHY, path)

    @inlineCallbacks
    def test_head_and_wrong_method(self) -> Any:
        server = start_server(self)
        response = yield http_request(server.port, "HEAD", "/health")
        self.assertEqual((response.status, response.body), (200, b""))
        response = yield http_request(server.port, "POST", "/health", body=b"{}")
        self.assertEqual(response.status, 405)

    @inlineCallbacks
    def test_not_found(self) -> Any:
        server = start_server(self)
        for path in ("/nope", "/health/extra", "/ws/extra", "/ready/x", "/metrics"):
            response = yield http_request(server.port, "GET", path)
            self.assertEqual(response.status, 404, path)
            self.assertEqual(response.headers["content-type"], "application/json", path)

    @inlineCallbacks
    def test_ready_with_memory_bus(self) -> Any:
        server = start_server(self)
        response = yield http_request(server.port, "GET", "/ready")
        self.assertEqual((response.status, response.body), (200, b'{"status":"ready"}'))
        self.assertEqual(response.headers["content-type"], "application/json")

    @inlineCallbacks
    def test_ready_503_while_stopping(self) -> Any:
        """A keep-alive connection (a load balancer's) sees 503 with the
        reason once the server is draining."""
        server = start_server(self, shutdown_timeout=5)
        conn = yield http_connect(server.port, test=self)
        response = yield conn.request("GET", "/ready")
        self.assertEqual(response.status, 200)
        # a client that never answers the close keeps the drain going
        yield raw_connect(server.port, test=self, answer_close=False)
        stopped = server.stopService()
        response = yield conn.request("GET", "/ready")
        self.assertEqual(response.status, 503)
        self.assertEqual(response.body, b'{"status":"not ready","reason":"shutting down"}')
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertFalse(stopped.called)
        yield stopped


class Metrics(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_disabled_is_404(self) -> Any:
        server = start_server(self, enable_metrics=False)
        response = yield http_request(server.port, "GET", "/metrics")
        self.assertEqual(response.status, 404)

    @inlineCallbacks
    def test_open_sockets_gauge(self) -> Any:
        server = start_server(self, enable_metrics=True)

        @inlineCallbacks
        def gauge() -> Any:
            response = yield http_request(server.port, "GET", "/metrics")
            self.assertEqual(response.status, 200)
            self.assertTrue(response.headers["content-type"].startswith("text/plain"), response.headers)
            text = response.body.decode()
            self.assertIn("# TYPE autogpt_websocket_connections_total gauge", text)
            match = re.search(r"^autogpt_websocket_connections_total (\S+)$", text, re.MULTILINE)
            assert match is not None, text
            return float(match.group(1))

        self.assertEqual((yield gauge()), 0.0)
        client = yield connect(server.port, test=self)
        self.assertEqual((yield gauge()), 1.0)
        second = yield connect(server.port, test=self)
        self.assertEqual((yield gauge()), 2.0)
        yield client.disconnect()
        yield second.disconnect()
        yield wait_for(lambda: server.stats.open_sockets == 0)
        self.assertEqual((yield gauge()), 0.0)


class CORS(TestCase):
    timeout = 30

    def origin_server(self) -> Any:
        return start_server(self, cors_allow_origins=(
            "http://localhost:3000", r"regex:https://[a-z]+\.example\.com"))

    @inlineCallbacks
    def test_allowed_origin_echoed_with_credentials(self) -> Any:
        server = self.origin_server()
        for origin in ("http://localhost:3000", "https://app.example.com"):
            response = yield http_request(server.port, "GET", "/health", {"Origin": origin})
            self.assertEqual(response.status, 200)
            self.assertEqual(response.body, HEALTHY)
            self.assertEqual(response.headers.get("access-control-allow-origin"), origin)
            self.assertEqual(response.headers.get("access-control-allow-credentials"), "true")

    @inlineCallbacks
    def test_disallowed_origin_gets_no_cors_headers(self) -> Any:
        server = self.origin_server()
        for origin in ("http://evil.test", "http://localhost:3001",
                       # a regex entry matches the whole origin, not a part
                       "https://app.example.com.evil.test", "xhttps://app.example.com",
                       "https://example.com"):
            response = yield http_request(server.port, "GET", "/health", {"Origin": origin})
            self.assertEqual(response.status, 200, origin)
            self.assertEqual(response.body, HEALTHY)
            cors = [name for name in response.headers if name.startswith("access-control-")]
            self.assertEqual(cors, [], origin)

    @inlineCallbacks
    def test_preflight(self) -> Any:
        server = self.origin_server()
        response = yield http_request(server.port, "OPTIONS", "/health", {
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "x-custom"})
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers.get("access-control-allow-origin"), "https://app.example.com")
        self.assertEqual(response.headers.get("access-control-allow-credentials"), "true")
        self.assertIn("GET", response.headers.get("access-control-allow-methods", ""))
        self.assertEqual(response.headers.get("access-control-allow-headers"), "x-custom")

        response = yield http_request(server.port, "OPTIONS", "/health", {
            "Origin": "http://evil.test", "Access-Control-Request-Method": "GET"})
        self.assertEqual(response.status, 400)
        self.assertNotIn("access-control-allow-origin", response.headers)


class AccessLog(TestCase):
    timeout = 30

    def capture(self, fmt: str) -> io.StringIO:
        """What an operator would read: every event through our observer,
        at debug level (Autobahn's handshake dumps included)."""
        txaio.use_twisted()
        self.addCleanup(txaio.set_global_log_level, txaio.get_global_log_level())
        stream = io.StringIO()
        observer = logs.make_observer("debug", fmt, stream)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return stream

    def raw_events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    @inlineCallbacks
    def test_token_never_logged(self) -> Any:
        for fmt in ("text", "json"):
            stream = self.capture(fmt)
            events = self.raw_events()
            server = start_server(self)
            yield http_request(server.port, "GET", "/health?token=SECRETXYZ&x=1")
            client = yield raw_connect(server.port, test=self, path="/ws?token=SECRETXYZ")
            yield client.request('{"method":"heartbeat","data":"ping","success":true}')
            yield client.abort()
            yield server.stopService()
            out = stream.getvalue()
            self.assertIn("GET /health?token=***&x=1 200 20B", out)
            self.assertNotIn("SECRETXYZ", out)
            # our access log redacts at the source, not only in the observer
            access = [event for event in events if event.get("log_namespace") == "autogpt_ws.web.routes"]
            self.assertEqual([formatEvent(event) for event in access], ["GET /health?token=***&x=1 200 20B"])
