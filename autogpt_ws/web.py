"""HTTP side of the one port: /, /health, /ready, /metrics, CORS, 404, and
the WebSocket endpoint mounted at /ws (PROTOCOL.md section 1)."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.server import Request, Site

from .origins import OriginList

log = Logger()

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
        return self._render_get(request)

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


class HeadDeadlineChannel(HTTPChannel):
    """An HTTP channel whose request head must arrive within the Site
    timeout (open_handshake_timeout).  twisted.web's own timeout is an idle
    timeout, reset by every byte, so a client trickling its request one byte
    at a time (slowloris) would otherwise hold the socket forever."""

    _head_call: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.timeOut:
            self._head_call = self.callLater(self.timeOut, self._head_expired)

    def allHeadersReceived(self) -> None:
        self._cancel_head()
        super().allHeadersReceived()

    def timeoutConnection(self) -> None:
        self._cancel_head()
        super().timeoutConnection()

    def connectionLost(self, reason: Any) -> None:
        self._cancel_head()
        super().connectionLost(reason)

    def _cancel_head(self) -> None:
        if self._head_call is not None and self._head_call.active():
            self._head_call.cancel()
        self._head_call = None

    def _head_expired(self) -> None:
        self._head_call = None
        self.setTimeout(None)
        self.timeoutConnection()


MAX_REQUEST_LINE = 8192
UPGRADE_LINES = (b"GET /ws ", b"GET /ws?")


class FrontDoor(Protocol):
    """Reads a connection's request line, then hands the connection on:
    ``GET /ws`` straight to the Autobahn factory (which parses the request
    head itself), anything else to twisted.web.  The upgrade then skips
    twisted.web's Request, its resource traversal and WebSocketResource's
    re-serialisation of the request for Autobahn to parse again: most of
    the cost of a connection.  The request line must arrive within the
    Site timeout (open_handshake_timeout)."""

    def __init__(self, site: "QuietSite", addr: Any) -> None:
        self.site = site
        self.addr = addr
        self.buffer = b""
        self.deadline: Any = None

    def connectionMade(self) -> None:
        if self.site.timeOut:
            self.deadline = self.site.reactor.callLater(self.site.timeOut, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        buffer = self.buffer + data
        if b"\r\n" not in buffer and len(buffer) < MAX_REQUEST_LINE:
            self.buffer = buffer
            return
        self._stop_deadline()
        if buffer.startswith(UPGRADE_LINES) and self.site.websocket is not None:
            successor = self.site.websocket.buildProtocol(self.addr)
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

    def _stop_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None


class QuietSite(Site):
    """The one port: a :class:`FrontDoor` per connection, then twisted.web
    for HTTP (and for ``/ws``, mounted as a WebSocketResource, whatever the
    front door did not recognise).  twisted.web's access log writes full
    URIs (tokens included) to the legacy log; ours is a structured debug
    line with the query redacted.  Its channels enforce a deadline on the
    request head."""

    def __init__(self, resource: Any, websocket: Any = None, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.websocket = websocket

    def protocol(self) -> Any:  # type: ignore[override]
        return _GenericHTTPChannelProtocol(HeadDeadlineChannel())

    def buildProtocol(self, addr: Any) -> Any:
        return FrontDoor(self, addr)

    def log(self, request: Request) -> None:  # type: ignore[override]
        log.debug("{method} {uri} {code} {size}B", method=request.method.decode("latin-1"),
                  uri=redact(request.uri), code=request.code, size=request.sentLength)
