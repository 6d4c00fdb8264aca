"""HTTP side of the one port: /, /health, /ready, /metrics, CORS, 404, and
the WebSocket endpoint mounted at /ws (PROTOCOL.md section 1)."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from autobahn.twisted.resource import WebSocketResource
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from ..config import Settings
from ..origins import OriginList
from ..stats import Stats
from .heads import OVERLOADED, HeadReader, HeadRefused, Refusal, refuse

log = Logger()

# the most a TCP transport reads at once (twisted.internet.tcp)
READ_SIZE = 2 ** 16

HEALTHY = b'{"status":"healthy"}'
ALLOW_METHODS = b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"


def _json(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()


class JSONPage(Resource):
    """A GET-only JSON route."""

    isLeaf = True

    def __init__(self, render_get: Callable[[Request], bytes]) -> None:
        super().__init__()
        self._render_get = render_get

    def render_GET(self, request: Request) -> bytes:
        return self._render_get(request)

    def render_HEAD(self, request: Request) -> bytes:
        # the GET answer's headers and length, no body (a body here makes
        # twisted.web log a warning on every HEAD)
        body = self._render_get(request)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b""

    def render(self, request: Request) -> bytes:
        if request.method in (b"GET", b"HEAD"):
            return super().render(request)  # type: ignore[no-any-return]
        request.setHeader(b"Allow", b"GET")
        return _json(request, 405, {"detail": "Method Not Allowed"})


class NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _json(request, 404, {"detail": "Not Found"})


class Preflight(Resource):
    """CORS preflight (OPTIONS with Access-Control-Request-Method)."""

    isLeaf = True

    def __init__(self, allowed: bool) -> None:
        super().__init__()
        self._allowed = allowed

    def render(self, request: Request) -> bytes:
        if not self._allowed:
            request.setResponseCode(400)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Disallowed CORS origin"
        request.setHeader(b"Access-Control-Allow-Methods", ALLOW_METHODS)
        wanted = request.getHeader(b"Access-Control-Request-Headers")
        if wanted:
            request.setHeader(b"Access-Control-Allow-Headers", wanted)
        request.setHeader(b"Access-Control-Max-Age", b"600")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"OK"


class Root(Resource):
    def __init__(self, websocket: IResource, ready: Callable[[], tuple[bool, str]],
                 metrics: Callable[[], bytes] | None, cors_origins: tuple[str, ...]) -> None:
        super().__init__()
        self._cors = OriginList(cors_origins)
        self._websocket = websocket
        self._ready = ready
        self._metrics = metrics
        self._not_found = NotFound()
        health = JSONPage(lambda request: _json(request, 200, HEALTHY))
        self._routes: dict[bytes, IResource] = {
            b"": health,
            b"health": health,
            b"ready": JSONPage(self._render_ready),
            b"metrics": JSONPage(self._render_metrics) if metrics is not None else self._not_found,
        }

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        if path == b"ws" and not request.postpath:
            return self._websocket
        origin = request.getHeader(b"Origin")
        allowed = origin is not None and self._cors.allows(origin.decode("latin-1"))
        if allowed:
            request.setHeader(b"Access-Control-Allow-Origin", origin)
            request.setHeader(b"Access-Control-Allow-Credentials", b"true")
            request.setHeader(b"Vary", b"Origin")
        if request.method == b"OPTIONS" and origin is not None and request.getHeader(b"Access-Control-Request-Method"):
            return Preflight(allowed)
        if request.postpath:
            return self._not_found
        return self._routes.get(path, self._not_found)

    def render(self, request: Request) -> bytes:
        return self._not_found.render(request)  # type: ignore[no-any-return]

    def _render_ready(self, request: Request) -> bytes:
        ready, reason = self._ready()
        if ready:
            return _json(request, 200, b'{"status":"ready"}')
        return _json(request, 503, {"status": "not ready", "reason": reason})

    def _render_metrics(self, request: Request) -> bytes:
        assert self._metrics is not None
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self._metrics()


_TOKEN = re.compile(rb"(token=)[^&\s]*", re.IGNORECASE)


def redact(uri: bytes) -> str:
    """A request URI fit for a log line: query tokens replaced."""
    return _TOKEN.sub(rb"\1***", uri).decode("latin-1")


class BoundedChannel(HTTPChannel):
    """twisted.web's HTTP/1.1 channel held to the bounds of a request
    (:mod:`heads`), for every request of a keep-alive connection:

    - each request head within the size bounds (414/431), and arriving
      within the Site timeout (open_handshake_timeout) from its first byte.
      twisted.web's own timeout is an idle timeout, reset by every byte, so
      a client trickling its request one byte at a time (slowloris) would
      otherwise hold the socket forever;
    - no body: no route takes one, so a body a request announces
      (Content-Length above 0, chunked) is never read: the request is
      answered at once as if it had none (405 for a POST), and the
      connection closed after the answer;
    - pipelined requests are parsed only while the client reads the
      answers: a read full of them does not pile up answers in memory.
      Once the transport's buffer is full the rest of the read is held and
      the connection is no longer read (twisted.web pauses it only between
      requests, and the pause comes while a request is answered); reading
      resumes, and the held requests are parsed, when the client has taken
      its answers.  At most ``max_held`` bytes are held (what one read can
      bring), past which the connection is aborted;
    - a WebSocket upgrade (:class:`Upgrade`) takes the connection over: the
      bytes that followed its head in the same read go to the WebSocket.

    The connection counts toward ``max_http_connections`` until it closes."""

    _head_call: Any = None
    _held: bytearray | None = None  # pipelined requests waiting for the client to read

    def connectionMade(self) -> None:
        super().connectionMade()
        self.head = self.site.head_reader()

    def dataReceived(self, data: bytes) -> None:
        if self._held is not None or self._waitingForTransport:
            self._hold(data)
            return
        start = 0
        while start < len(data) and not self.transport.disconnecting:
            if not self.head.started:
                self._start_head()
            try:
                end = self.head.feed(data, start)
            except HeadRefused as refused:
                self._refuse(refused.refusal)
                return
            if end < 0:
                super().dataReceived(data[start:] if start else data)
                return
            self._cancel_head()
            transport = self.transport
            super().dataReceived(data[start:end])
            start = end
            if self.transport is None:  # a WebSocket took the connection over (Upgrade)
                if start < len(data):
                    _taker(transport).dataReceived(data[start:])
                return
            if self._waitingForTransport and start < len(data):
                self._hold(data[start:])
                return

    def _hold(self, data: bytes) -> None:
        """Keep ``data`` until the client has read its answers, reading no
        more meanwhile."""
        held = self._held
        if held is None:
            held = self._held = bytearray()
            self._networkProducer.pauseProducing()  # resumed by resumeProducing
        held += data
        if len(held) > self.site.max_held:
            log.info("a client pipelined {size} bytes of requests without reading the answers: aborting",
                     size=len(held))
            self._held = None
            self.transport.abortConnection()

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self._held is not None and not self._waitingForTransport:
            held, self._held = self._held, None
            self.dataReceived(bytes(held))

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        request.requestHeaders.removeHeader(b"Expect")  # never invite a body: no "100 Continue"
        body = self.length != 0  # Content-Length above 0, or chunked (None)
        if body:
            # no route takes a body: answer as if there were none, read none
            # of it, and close after the answer
            self.length = 0
            self._transferDecoder = None
            self.site.refused("body")
        super().allHeadersReceived()
        if body:
            self.persistent = False
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])

    def _refuse(self, refusal: Refusal) -> None:
        self._cancel_head()
        self.site.refused(refusal.label)
        refuse(self.transport, refusal)

    def timeoutConnection(self) -> None:
        self._cancel_head()
        super().timeoutConnection()

    def connectionLost(self, reason: Any) -> None:
        self._cancel_head()
        self.site.http_closed()
        super().connectionLost(reason)

    def _start_head(self) -> None:
        if self.timeOut and self._head_call is None:
            self._head_call = self.callLater(self.timeOut, self._head_expired)

    def _cancel_head(self) -> None:
        if self._head_call is not None and self._head_call.active():
            self._head_call.cancel()
        self._head_call = None

    def _head_expired(self) -> None:
        self._head_call = None
        self.setTimeout(None)
        self.timeoutConnection()


def _taker(transport: Any) -> Any:
    """The protocol a WebSocket upgrade (Autobahn's WebSocketResource.render)
    connected to ``transport`` in place of twisted.web's channel."""
    if isinstance(transport, ProtocolWrapper):  # TLS
        return transport.wrappedProtocol
    if isinstance(transport.protocol, ProtocolWrapper):
        return transport.protocol.wrappedProtocol
    return transport.protocol


UPGRADE_LINES = (b"GET /ws ", b"GET /ws?")


class FrontDoor(Protocol):
    """Reads a connection's first request head (bounded, :mod:`heads`),
    then hands the connection on: ``GET /ws`` straight to the Autobahn
    factory (which parses the head itself), anything else to twisted.web.
    The upgrade then skips twisted.web's Request, its resource traversal
    and WebSocketResource's re-serialisation of the request for Autobahn to
    parse again: most of the cost of a connection.  The head must arrive
    within the Site timeout (open_handshake_timeout)."""

    def __init__(self, site: "QuietSite", addr: Any) -> None:
        self.site = site
        self.addr = addr
        self.head = site.head_reader()
        self.buffer: bytearray | None = None  # the head so far, when it takes several reads
        self.deadline: Any = None
        self.done = False  # refused, or handed on

    def connectionMade(self) -> None:
        if self.site.timeOut:
            self.deadline = self.site.reactor.callLater(self.site.timeOut, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        try:
            end = self.head.feed(data)
        except HeadRefused as refused:
            self.done = True
            self._stop_deadline()
            self.site.refused(refused.refusal.label)
            refuse(self.transport, refused.refusal)
            return
        if self.buffer is None:
            if end < 0:  # rare: most heads come in one read
                self.buffer = bytearray(data)  # one growing block, whatever the reads
                return
            buffer = data
        else:
            self.buffer += data
            if end < 0:
                return
            buffer = bytes(self.buffer)
            self.buffer = None
        self.done = True
        self._stop_deadline()
        if buffer.startswith(UPGRADE_LINES) and self.site.websocket is not None:
            successor = self.site.websocket.buildProtocol(self.addr)
            self.site.http_closed()  # a WebSocket from now on: max_connections counts it
        else:
            successor = Site.buildProtocol(self.site, self.addr)
        transport: Any = self.transport
        if isinstance(transport, ProtocolWrapper):  # TLS
            transport.wrappedProtocol = successor
        else:
            transport.protocol = successor
        successor.makeConnection(transport)
        successor.dataReceived(buffer)

    def connectionLost(self, reason: Any = None) -> None:
        self._stop_deadline()
        self.site.http_closed()  # (once handed on, the successor hears of the close)

    def _stop_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None


class Upgrade(WebSocketResource):
    """``/ws`` on the Site, for the upgrades the front door does not see
    (a keep-alive connection's later request): the WebSocket takes the
    connection from twisted.web, which then no longer counts it."""

    def render(self, request: Request) -> Any:
        channel = request.channel
        result = super().render(request)
        if channel.transport is None:  # taken over
            channel.site.http_closed()
        return result


class Overloaded(Protocol):
    """The answer to a connection beyond ``max_http_connections``."""

    def connectionMade(self) -> None:
        refuse(self.transport, OVERLOADED)


class QuietSite(Site):
    """The one port: a :class:`FrontDoor` per connection, then twisted.web
    for HTTP (and for ``/ws``, mounted as :class:`Upgrade`, whatever the
    front door did not recognise).  twisted.web's access log writes full
    URIs (tokens included) to the legacy log; ours is a structured debug
    line with the query redacted.  Its channels hold every request to the
    bounds of :mod:`heads` and count toward ``max_http_connections``."""

    def __init__(self, resource: Any, settings: Settings, stats: Stats, websocket: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.websocket = websocket
        self.stats = stats
        self.max_request_line = settings.max_request_line
        self.max_request_head = settings.max_request_head
        self.max_http_connections = settings.max_http_connections
        # pipelined bytes a channel may hold while its client does not read:
        # one read (with the head before it, on a connection's first read)
        self.max_held = settings.max_request_head + READ_SIZE
        self.http_connections = 0  # connections that are not (yet) WebSockets

    def head_reader(self) -> HeadReader:
        return HeadReader(self.max_request_line, self.max_request_head)

    def refused(self, label: str) -> None:
        """Count a request or connection refused by a bound (or a body not read)."""
        self.stats.http_refused[label] += 1

    def http_closed(self) -> None:
        self.http_connections -= 1

    def protocol(self) -> Any:  # type: ignore[override]
        return _GenericHTTPChannelProtocol(BoundedChannel())

    def buildProtocol(self, addr: Any) -> Any:
        if self.max_http_connections and self.http_connections >= self.max_http_connections:
            self.refused(OVERLOADED.label)
            return Overloaded()
        self.http_connections += 1
        return FrontDoor(self, addr)

    def log(self, request: Request) -> None:  # type: ignore[override]
        log.debug("{method} {uri} {code} {size}B", method=request.method.decode("latin-1"),
                  uri=redact(request.uri), code=request.code, size=request.sentLength)
