"""Real parts for tests: servers on loopback port 0, an Autobahn client,
signed JWTs, and a redis-server the tests start on a free port."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from autogpt_ws.config import DEFAULT_USER_ID, Settings, load
from autogpt_ws.running.service import WebsocketServer

U = DEFAULT_USER_ID


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test server: loopback, port 0, auth off, no env read."""
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "enable_auth": False}
    values.update(overrides)
    return load(None, env={}, overrides=values)


def start_server(test: TestCase, settings: Settings | None = None, **overrides: Any) -> WebsocketServer:
    """A running server; stopped (sockets closed) at test cleanup."""
    server = WebsocketServer(settings or make_settings(**overrides), reactor=reactor)
    server.privilegedStartService()
    server.startService()
    test.addCleanup(lambda: server.stopService() if server.running else None)
    return server


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        yield sleep(interval)


class Replies:
    """Waiting for messages, for a test client that appends every text
    message to ``messages`` and answers ``_waiters`` as they come."""

    messages: list[bytes]
    _waiters: list[tuple[int, Deferred[bytes]]]

    def send(self, payload: bytes | str) -> None:
        raise NotImplementedError

    def message(self, index: int, timeout: float = 5.0) -> Deferred[bytes]:
        """The index-th message received (0-based), when it arrives."""
        if index < len(self.messages):
            return succeed(self.messages[index])
        waiter: Deferred[bytes] = Deferred()
        self._waiters.append((index, waiter))
        waiter.addTimeout(timeout, reactor)
        return waiter

    @inlineCallbacks
    def request(self, payload: bytes | str, timeout: float = 5.0) -> Any:
        """Send a frame and return the next message."""
        index = len(self.messages)
        self.send(payload)
        reply = yield self.message(index, timeout)
        return reply


class Client(Replies, WebSocketClientProtocol):
    """Collects every text frame; close code and reason when closed."""

    def onConnect(self, response: Any) -> None:
        self.messages: list[bytes] = []
        self.binary: list[bytes] = []
        self._waiters: list[tuple[int, Deferred[bytes]]] = []
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        (self.binary if isBinary else self.messages).append(payload)
        ready = [w for w in self._waiters if w[0] < len(self.messages)]
        self._waiters = [w for w in self._waiters if w[0] >= len(self.messages)]
        for index, waiter in ready:
            waiter.callback(self.messages[index])

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(self.wasNotCleanReason or reason or "closed"))
        if not hasattr(self, "closed"):
            self.closed = Deferred()
        if not self.closed.called:
            self.closed.callback((code, reason))

    def send(self, payload: bytes | str) -> None:
        self.sendMessage(payload.encode() if isinstance(payload, str) else payload)

    def disconnect(self) -> Deferred[Any]:
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        elif self.state != self.STATE_CLOSED:
            self.dropConnection(abort=True)
        return self.closed


def connect(port: int, token: str | None = None, path: str = "/ws", query: str = "",
            headers: dict[str, str] | None = None, compress: bool = False,
            test: TestCase | None = None) -> Deferred[Client]:
    """Open a real WebSocket to 127.0.0.1:port; fires with the open Client
    (or fails if the handshake is refused)."""
    url = f"ws://127.0.0.1:{port}{path}"
    params = [p for p in ([f"token={token}"] if token is not None else []) + ([query] if query else []) if p]
    if params:
        url += "?" + "&".join(params)
    factory = WebSocketClientFactory(url, headers=headers or {}, reactor=reactor)
    factory.protocol = Client
    factory.opened = Deferred()
    options: dict[str, Any] = {"autoPingInterval": 0, "openHandshakeTimeout": 5, "closeHandshakeTimeout": 1}
    if compress:
        from autobahn.websocket.compress import (PerMessageDeflateOffer, PerMessageDeflateResponse,
                                                 PerMessageDeflateResponseAccept)

        options["perMessageCompressionOffers"] = [PerMessageDeflateOffer()]
        options["perMessageCompressionAccept"] = lambda r: PerMessageDeflateResponseAccept(r) if isinstance(r, PerMessageDeflateResponse) else None
    factory.setProtocolOptions(**options)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    d = endpoint.connect(factory)

    def opened(proto: Client) -> Deferred[Client]:
        if test is not None:
            test.addCleanup(proto.disconnect)
        return factory.opened

    d.addCallback(opened)
    return d


# -- JWTs ---------------------------------------------------------------------

SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"


def token(sub: Any = "user-1", key: Any = SECRET, algorithm: str = "HS256", aud: Any = "authenticated",
          headers: dict[str, Any] | None = None, **claims: Any) -> str:
    import jwt

    payload: dict[str, Any] = {"aud": aud, **claims}
    if sub is not None:
        payload["sub"] = sub
    if aud is None:
        del payload["aud"]
    if "exp" not in claims:
        payload["exp"] = int(time.time()) + 3600
    elif claims["exp"] is None:
        del payload["exp"]
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def padded(event: dict[str, Any], size: int) -> dict[str, Any]:
    """``event`` with a ``pad`` key making its published envelope exactly
    ``size`` bytes."""
    from autogpt_ws.producing.publish import envelope

    base = len(envelope({**event, "pad": ""}, max_size=size * 2))
    event = {**event, "pad": "x" * (size - base)}
    assert len(envelope(event, max_size=size * 2)) == size
    return event


# -- redis-server -------------------------------------------------------------


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_random = __import__("random").SystemRandom()


def free_port() -> int:
    """A free loopback port for a server a test starts, below the kernel's
    ephemeral range: a port the kernel hands out for outgoing connections
    (bind to 0, or any connect) could otherwise be taken from under a Redis
    node a test stops and starts again on its port."""
    high = min(_ephemeral_low(), 45000)  # cluster nodes' bus ports (port + 10000) stay below 55536 too
    for _ in range(200):
        port = _random.randrange(20000, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a crowded range: let the kernel pick
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A real redis-server on a free loopback port, in its own directory."""

    def __init__(self, port: int | None = None, extra: tuple[str, ...] = (),
                 bind: tuple[str, ...] = ("127.0.0.1",)) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SkipTest("redis-server is not installed (tests/run.sh installs it)")
        self.binary = binary
        self.port = port or free_port()
        self.extra = extra
        self.bind = bind
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", *self.bind, "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--daemonize", "no", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, *args: str | bytes) -> bytes:
        """One blocking command over a fresh connection (test setup only)."""
        parts = [a.encode() if isinstance(a, str) else a for a in args]
        out = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(out)
            return sock.recv(65536)


def redis_server(test: TestCase, **kwargs: Any) -> RedisServer:
    server = RedisServer(**kwargs).start()
    test.addCleanup(server.cleanup)
    return server


PYTHON = os.environ.get("AUTOGPT_WS_TEST_PYTHON") or __import__("sys").executable


# -- raw WebSocket clients (no Autobahn: cheap, and free to misbehave) --------

import base64 as _b64  # noqa: E402
import struct as _struct  # noqa: E402
import zlib  # noqa: E402

from twisted.internet.protocol import ClientFactory as _ClientFactory, Protocol as _Protocol  # noqa: E402


class HandshakeRefused(Exception):
    """The server answered the upgrade with an HTTP status other than 101."""

    def __init__(self, status: int, head: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.head = head


def ws_client_frame(payload: bytes, opcode: int = 0x1, fin: bool = True, mask: bytes | None = None,
                    rsv1: bool = False) -> bytes:
    """An RFC 6455 client frame (masked, as a client must); ``rsv1`` marks
    the first frame of a compressed message."""
    key = os.urandom(4) if mask is None else mask
    size = len(payload)
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    if size < 126:
        head = bytes((first, 0x80 | size))
    elif size < 65536:
        head = _struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = _struct.pack("!BBQ", first, 0x80 | 127, size)
    if size:
        repeated = (key * (size // 4 + 1))[:size]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")
    return head + key + payload


def deflated(payload: bytes, compressor: Any = None) -> bytes:
    """``payload`` as one permessage-deflate message body (RFC 7692: raw
    deflate, flushed, without the final 00 00 ff ff): compressed on its
    own, or by ``compressor``, kept across messages (context takeover)."""
    if compressor is None:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]


def raw_upgrade_request(path: str = "/ws", host: str = "127.0.0.1", headers: dict[str, str] | None = None) -> bytes:
    """An RFC 6455 upgrade request with a fresh key and any extra headers."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {_b64.b64encode(os.urandom(16)).decode()}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class RawClient(Replies, _Protocol):
    """A minimal WebSocket client protocol written by hand: sends the upgrade,
    parses the server's frames, answers pings and closes unless told not to.

    ``opened`` fires with the client on 101 (errback HandshakeRefused
    otherwise), ``lost`` when the TCP connection is gone.  Text frames go to
    ``messages``; ``close_code``/``close_reason`` hold the server's close
    frame, ``pings`` and ``pongs`` count pings and pongs received,
    ``lost_reason`` is why the connection ended.  With ``deflate`` it offers
    permessage-deflate (``deflate`` is the offer, or True for the bare one)
    and, when the server takes it up, inflates compressed messages with
    one inflater for the socket's life, as browsers do, of the window the
    server answered.  ``head`` is the server's answer to the upgrade;
    ``compressed`` and ``wire`` say, for each message kept, whether it
    came compressed (RSV1) and its frame's bytes."""

    def __init__(self, path: str = "/ws", headers: dict[str, str] | None = None,
                 answer_pings: bool = True, answer_close: bool = True, keep_messages: bool = True,
                 deflate: bool | str = False) -> None:
        self.path = path
        self.headers = headers
        self.inflater: Any = None
        if deflate:
            offer = deflate if isinstance(deflate, str) else "permessage-deflate"
            self.headers = {**(headers or {}), "Sec-WebSocket-Extensions": offer}
        self.head = b""
        self.compressed: list[bool] = []
        self.wire: list[bytes] = []
        self.answer_pings = answer_pings
        self.answer_close = answer_close
        self.keep_messages = keep_messages
        self.transport: Any = None
        self.opened: Deferred[RawClient] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.messages: list[bytes] = []
        self.message_count = 0
        self.pings = 0
        self.pongs = 0
        self.lost_reason: Any = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.status: int | None = None
        self._buffer = b""
        self._upgraded = False
        self._waiters: list[tuple[int, Deferred[bytes]]] = []
        self._fragments: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.write(raw_upgrade_request(self.path, headers=self.headers))

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._upgraded:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buffer = self._buffer[:end + 4], self._buffer[end + 4:]
            try:
                self.status = int(head.split(b" ", 2)[1])
            except (IndexError, ValueError):
                self.status = 0
            if self.status != 101:
                self.transport.loseConnection()
                if not self.opened.called:
                    self.opened.errback(HandshakeRefused(self.status, head))
                return
            self._upgraded = True
            self.head = head
            self.inflater = _inflater(head)
            self.opened.callback(self)
        self._frames()

    def _frames(self) -> None:
        buf = self._buffer
        pos = 0
        while len(buf) - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            size = second & 0x7F
            head = 2
            if size == 126:
                if len(buf) - pos < 4:
                    break
                size = _struct.unpack_from("!H", buf, pos + 2)[0]
                head = 4
            elif size == 127:
                if len(buf) - pos < 10:
                    break
                size = _struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            if len(buf) - pos < head + size:
                break
            payload = buf[pos + head:pos + head + size]
            if self.keep_messages and first & 0x0F in (0x1, 0x2):  # the server never fragments
                self.compressed.append(bool(first & 0x40))
                self.wire.append(buf[pos:pos + head + size])
            pos += head + size
            if first & 0x40 and self.inflater is not None:
                payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
            self._frame(first & 0x80, first & 0x0F, payload)
        self._buffer = buf[pos:]

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == 0x9:
            self.pings += 1
            if self.answer_pings:
                self.send(payload, opcode=0xA)
        elif opcode == 0xA:
            self.pongs += 1
        elif opcode == 0x8:
            if self.close_code is None:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_reason = payload[2:].decode("utf-8", "replace")
                if self.answer_close:
                    self.send(payload[:2], opcode=0x8)
        elif opcode in (0x0, 0x1, 0x2):
            self._fragments.append(payload)
            if fin:
                message = b"".join(self._fragments)
                self._fragments = []
                self.message_count += 1
                if self.keep_messages:
                    self.messages.append(message)
                    self._wake()

    def _wake(self) -> None:
        count = len(self.messages)
        ready = [w for w in self._waiters if w[0] < count]
        if ready:
            self._waiters = [w for w in self._waiters if w[0] >= count]
            for index, waiter in ready:
                waiter.callback(self.messages[index])

    def connectionLost(self, reason: Any) -> None:
        if not self.opened.called:
            self.opened.errback(HandshakeRefused(self.status or 0, b""))
        for _, waiter in self._waiters:
            waiter.errback(ConnectionError("connection lost"))
        self._waiters = []
        self.lost_reason = reason
        self.lost.callback(None)

    # actions

    def send(self, payload: bytes | str, opcode: int = 0x1, fin: bool = True) -> None:
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        self.transport.write(ws_client_frame(data, opcode, fin))

    def send_compressed(self, payload: bytes | str, compressor: Any = None) -> None:
        """A compressed text message, as a browser sends one (:func:`deflated`)."""
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        self.transport.write(ws_client_frame(deflated(data, compressor), rsv1=True))

    def abort(self) -> Deferred[None]:
        """Drop the TCP connection now; fires when it is gone."""
        if not self.lost.called and self.transport is not None:
            self.transport.abortConnection()
        return self.lost


def extensions_answer(head: bytes) -> str | None:
    """The Sec-WebSocket-Extensions of a server's answer to the upgrade."""
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "sec-websocket-extensions":
            return value.strip()
    return None


def _inflater(head: bytes) -> Any:
    """A raw inflater of the window the server's answer names, when it
    took up permessage-deflate."""
    answer = extensions_answer(head) or ""
    if "permessage-deflate" not in answer:
        return None
    bits = re.search(r"server_max_window_bits=(\d+)", answer)
    return zlib.decompressobj(-int(bits.group(1)) if bits else -zlib.MAX_WBITS)


class _One(_ClientFactory):
    """Hands out one protocol instance; a failed connect fails its ``opened``
    or ``done`` Deferred."""

    noisy = False

    def __init__(self, protocol: _Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> _Protocol:
        return self.protocol_instance

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        waiter = getattr(self.protocol_instance, "opened", None) or getattr(self.protocol_instance, "done")
        if not waiter.called:
            waiter.errback(reason)
        lost = getattr(self.protocol_instance, "lost", None)
        if lost is not None and not lost.called:
            lost.callback(None)


def _raw_factory(client: _Protocol) -> _One:
    return _One(client)


def raw_connect(port: int, client: RawClient | None = None, test: TestCase | None = None,
                rcvbuf: int | None = None, **kwargs: Any) -> Deferred[RawClient]:
    """Open a RawClient to 127.0.0.1:port; fires when the upgrade is
    answered 101 (fails with HandshakeRefused otherwise).  ``rcvbuf`` sets
    SO_RCVBUF before connecting (a client meant to stop reading).  With
    ``test``, the socket is aborted and awaited at cleanup."""
    client = client or RawClient(**kwargs)
    if test is not None:
        test.addCleanup(client.abort)
    if rcvbuf is None:
        reactor.connectTCP("127.0.0.1", port, _raw_factory(client), timeout=5)
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.connect(("127.0.0.1", port))  # completes in the kernel's accept queue
            sock.setblocking(False)
            reactor.adoptStreamConnection(sock.fileno(), socket.AF_INET, _raw_factory(client))
    return client.opened


def server_side(server: WebsocketServer, client: Any) -> Any:
    """The server's protocol for a client socket (RawClient or Client)."""
    port = client.transport.getHost().port
    for proto in server.factory.sockets:
        if proto.transport is not None and proto.transport.getPeer().port == port:
            return proto
    raise LookupError(f"no server socket for client port {port}")


def tcp_buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds unsent in user space."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class _HTTPGet(_Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(b"".join(self.chunks))


@inlineCallbacks
def http_fetch(port: int, path: str, headers: dict[str, str] | None = None) -> Any:
    """(status, header dict with lower-case names, body) of an HTTP/1.0 GET
    on 127.0.0.1:port; fires once the server has closed the connection."""
    lines = [f"GET {path} HTTP/1.0", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    proto = _HTTPGet(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    reactor.connectTCP("127.0.0.1", port, _raw_factory(proto), timeout=5)
    raw = yield proto.done
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), found, body


# -- raw TCP ------------------------------------------------------------------

from typing import Callable  # noqa: E402


def raw_request(port: int, data: bytes, timeout: float = 5.0,
                until: Callable[[bytes], bool] | None = None) -> Deferred[bytes]:
    """Write ``data`` to 127.0.0.1:port and fire with every byte received
    until the server closes, ``until(received)`` is true (then this side
    closes), or ``timeout`` passes (then the connection is aborted); fires
    with what came so far. For answers a WebSocket client library would
    hide: an HTTP 403 to an upgrade, the exact bytes after a 101."""
    from twisted.internet.protocol import Factory, Protocol

    done: Deferred[bytes] = Deferred()

    class Collect(Protocol):
        def __init__(self) -> None:
            self.chunks: list[bytes] = []
            self.timer: Any = None

        def connectionMade(self) -> None:
            self.transport.write(data)  # type: ignore[union-attr]
            self.timer = reactor.callLater(timeout, self.transport.abortConnection)  # type: ignore[attr-defined,union-attr]

        def dataReceived(self, chunk: bytes) -> None:
            self.chunks.append(chunk)
            if until is not None and until(b"".join(self.chunks)):
                self.transport.abortConnection()  # type: ignore[union-attr]

        def connectionLost(self, reason: Any = None) -> None:
            if self.timer is not None and self.timer.active():
                self.timer.cancel()
            if not done.called:
                done.callback(b"".join(self.chunks))

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    endpoint.connect(Factory.forProtocol(Collect)).addErrback(lambda f: done.called or done.errback(f))
    return done


def upgrade_request(path: str, host: str = "127.0.0.1") -> bytes:
    """A minimal RFC 6455 upgrade request for ``path`` (query included)."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode("ascii")


# -- appended for the Redis bus tests -----------------------------------------


@inlineCallbacks
def http_get(port: int, path: str) -> Any:
    """GET http://127.0.0.1:port/path on a fresh connection: (status, body)."""
    from twisted.web.client import Agent, HTTPConnectionPool, readBody

    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = yield agent.request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
    body = yield readBody(response)
    return response.code, body


def redis_clients(redis: RedisServer, kind: str = "pubsub", password: str = "") -> list[bytes]:
    """The lines of CLIENT LIST TYPE <kind> (one per connection)."""
    if password:
        with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as sock:
            sock.sendall(b"AUTH %s\r\nCLIENT LIST TYPE %s\r\n" % (password.encode(), kind.encode()))
            reply = b""
            while reply.count(b"\r\n") < 3:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        if not reply.startswith(b"+OK\r\n"):
            raise AssertionError(f"AUTH failed: {reply!r}")
        reply = reply[5:]
    else:
        reply = redis.command("CLIENT", "LIST", "TYPE", kind)
    if not reply.startswith(b"$"):
        raise AssertionError(f"CLIENT LIST failed: {reply!r}")
    return [line for line in reply.split(b"\r\n", 1)[1].splitlines() if line.startswith(b"id=")]


# -- a real Redis Cluster, AutoGPT's database, a sharded producer ------------
# (tests/test_bus_cluster.py; module-wide fixtures: trial has no setUpClass)

import atexit as _atexit  # noqa: E402
import subprocess as _subprocess  # noqa: E402
import uuid as _uuid  # noqa: E402
from urllib.parse import urlsplit as _urlsplit, urlunsplit as _urlunsplit  # noqa: E402

import hiredis as _hiredis  # noqa: E402
from twisted.internet.defer import DeferredLock as _DeferredLock, gatherResults as _gatherResults  # noqa: E402

from autogpt_ws.bus.executions import APPLICATION_NAME as _APPLICATION_NAME  # noqa: E402
from autogpt_ws.bus.resp import (RedisError as _RedisError, RedisProtocol as _RedisProtocol,  # noqa: E402
                                 connect as _redis_connect, encode as _encode)
from autogpt_ws.bus.shard import closed as _closed  # noqa: E402

CLUSTER_ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-require-full-coverage", "no")
POSTGRES_ADMIN_URL = os.environ.get("AUTOGPT_WS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


# port -> password of the test Redis servers that have one (redis_call logs in)
PASSWORDS: dict[int, str] = {}


def redis_call(port: int, *args: str | bytes | int) -> Any:
    """One command on a fresh blocking connection (test setup and checks);
    logs in first where the server on ``port`` has a password."""
    reader = _hiredis.Reader()
    password = PASSWORDS.get(port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall((_encode(("AUTH", password)) if password else b"") + _encode(args))
        answers = 2 if password else 1
        while True:
            reply = reader.gets()
            if reply is not False:
                answers -= 1
                if answers == 0:
                    return reply
                if isinstance(reply, _hiredis.ReplyError):
                    raise ConnectionError(f"redis on {port} refused the password: {reply}")
                continue
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"redis on {port} closed the connection")
            reader.feed(chunk)


class RedisCluster:
    """3 masters, each with ``replicas`` replicas."""

    def __init__(self, replicas: int = 0, node_timeout: int = 5000, password: str = "",
                 bind: tuple[str, ...] = ("127.0.0.1",), announce: Any = None) -> None:
        """``announce(index)`` gives node ``index`` more arguments (what it
        announces: cluster-announce-ip/-hostname...); ``password`` is
        required on every node (requirepass and masterauth)."""
        if shutil.which("redis-cli") is None:
            raise SkipTest("redis-cli is not installed")
        self.replicas = replicas
        self.password = password
        auth = ("--requirepass", password, "--masterauth", password) if password else ()
        # the cluster bus port defaults to port + 10000, which may not exist
        # or be free: pick it too
        self.nodes = [RedisServer(extra=(*CLUSTER_ARGS, "--cluster-node-timeout", str(node_timeout),
                                         "--cluster-port", str(free_port()), *auth,
                                         *(announce(index) if announce is not None else ())), bind=bind)
                      for index in range(3 * (1 + replicas))]
        for node in self.nodes:
            if password:
                PASSWORDS[node.port] = password

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        _subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                         "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                        check=True, capture_output=True, timeout=60,
                        env={**os.environ, "REDISCLI_AUTH": self.password} if self.password else None)
        self.wait_ok()

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every node says cluster_state:ok, they agree on the owners, and
        every master has its replicas in sync."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                views = [sorted((e[0], e[1], e[2][1], len(e) - 3) for e in redis_call(p, "CLUSTER", "SLOTS"))
                         for p in self.ports]
                states = [b"cluster_state:ok" in redis_call(p, "CLUSTER", "INFO") for p in self.ports]
                replication = [redis_call(p, "INFO", "replication") for p in self.ports]
                synced = all(b"role:master" in r or b"master_link_status:up" in r for r in replication)
                if (all(states) and synced and all(v == views[0] for v in views) and len({e[2] for e in views[0]}) == 3
                        and sum(e[1] - e[0] + 1 for e in views[0]) == 16384
                        and all(e[3] == self.replicas for e in views[0])):
                    return
            except (OSError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the test cluster did not become ok")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def alive(self) -> int:
        return next(n.port for n in self.nodes if n.process is not None)

    def keyslot(self, channel: str) -> int:
        return int(redis_call(self.alive(), "CLUSTER", "KEYSLOT", channel))

    def owner(self, channel: str) -> int:
        """Port of the master the cluster says owns ``channel``."""
        slot = self.keyslot(channel)
        for entry in redis_call(self.alive(), "CLUSTER", "SLOTS"):
            if entry[0] <= slot <= entry[1]:
                return int(entry[2][1])
        raise AssertionError(f"no owner for slot {slot}")

    def replica_of(self, port: int) -> int:
        master_id = redis_call(port, "CLUSTER", "MYID").decode()
        line = redis_call(port, "CLUSTER", "REPLICAS", master_id)[0].decode()
        return int(line.split()[1].split("@")[0].rpartition(":")[2])

    def shard_channels(self, port: int) -> set[str]:
        return {c.decode() for c in redis_call(port, "PUBSUB", "SHARDCHANNELS")}

    def clients(self, port: int, pubsub_only: bool = False, name: str = "autogpt-ws-cluster") -> int:
        """Connections named ``name`` (the bus's subscribers) on that node."""
        args = ("CLIENT", "LIST", "TYPE", "pubsub") if pubsub_only else ("CLIENT", "LIST")
        lines = redis_call(port, *args).decode().splitlines()
        return sum(1 for line in lines if f" name={name} " in f" {line} ")

    def migrate(self, slot: int, target: int) -> None:
        """Move one (empty) slot to ``target``, as `redis-cli --cluster
        reshard` does for each slot: IMPORTING, MIGRATING, then NODE."""
        source = next(p for p in self.ports if any(e[0] <= slot <= e[1] and e[2][1] == p
                                                   for e in redis_call(p, "CLUSTER", "SLOTS")))
        ids = {p: redis_call(p, "CLUSTER", "MYID").decode() for p in self.ports}
        redis_call(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        redis_call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        for port in (target, source, *(p for p in self.ports if p not in (source, target))):
            redis_call(port, "CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        self.wait_ok()


_fixtures: dict[str, Any] = {}


def shared_fixture(name: str, make: Any) -> Any:
    """A module-wide fixture, built on first use and torn down at exit; a
    failure (or skip) to build it is remembered and raised again."""
    if name not in _fixtures:
        try:
            _fixtures[name] = make()
        except BaseException as exc:
            _fixtures[name] = exc
    value = _fixtures[name]
    if isinstance(value, BaseException):
        raise value
    return value


def make_cluster(replicas: int = 0, node_timeout: int = 5000, **kwargs: Any) -> RedisCluster:
    cluster = RedisCluster(replicas, node_timeout, **kwargs)
    _atexit.register(cluster.stop)
    cluster.start()
    return cluster


class AutogptDatabase:
    """A database of our own holding AutoGPT's AgentGraphExecution table."""

    def __init__(self) -> None:
        import psycopg

        self.psycopg = psycopg
        try:
            admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
        except psycopg.OperationalError as exc:
            raise SkipTest(f"PostgreSQL is not reachable at {_urlsplit(POSTGRES_ADMIN_URL).hostname}: {exc}") from None
        self.name = "autogpt_ws_test_" + _uuid.uuid4().hex[:12]
        with admin:
            admin.execute(f'CREATE DATABASE "{self.name}"')
        parts = _urlsplit(POSTGRES_ADMIN_URL)
        self.url = _urlunsplit(parts._replace(path="/" + self.name))
        self.conn = psycopg.connect(self.url, autocommit=True)
        for schema in ("public", "platform"):
            self.conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            # the columns the lookup reads, as AutoGPT's Prisma schema names them
            self.conn.execute(f'CREATE TABLE "{schema}"."AgentGraphExecution" '
                              '("id" text PRIMARY KEY, "agentGraphId" text NOT NULL, "userId" text NOT NULL, '
                              '"isDeleted" boolean NOT NULL DEFAULT false)')

    def add(self, exec_id: str, graph_id: str, user_id: str, schema: str = "public") -> None:
        self.conn.execute(f'INSERT INTO "{schema}"."AgentGraphExecution" ("id", "agentGraphId", "userId") '
                          'VALUES (%s, %s, %s)', (exec_id, graph_id, user_id))

    def delete(self, exec_id: str, schema: str = "public") -> None:
        self.conn.execute(f'DELETE FROM "{schema}"."AgentGraphExecution" WHERE "id" = %s', (exec_id,))

    def soft_delete(self, exec_id: str, schema: str = "public") -> None:
        """What AutoGPT does when a user deletes a run."""
        self.conn.execute(f'UPDATE "{schema}"."AgentGraphExecution" SET "isDeleted" = true WHERE "id" = %s',
                          (exec_id,))

    def our_connections(self) -> int:
        row = self.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                                (self.name, _APPLICATION_NAME)).fetchone()
        return int(row[0]) if row else 0

    def drop(self) -> None:
        self.conn.close()
        with self.psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def make_database() -> AutogptDatabase:
    database = AutogptDatabase()
    _atexit.register(database.drop)
    return database


class ClusterPublisher:
    """SPUBLISH like a Redis Cluster client (redis-py's ``spublish``): to the
    master its slot map (CLUSTER SLOTS) names, following MOVED; a dead node
    or :meth:`refresh` drops the routes.  (A stale route after a manual
    failover would still "work": Redis 7.0 serves SPUBLISH on a replica for
    its master's slots, to the replica's own subscribers only.)"""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self.route: dict[str, tuple[str, int]] = {}
        self.conns: dict[tuple[str, int], _RedisProtocol] = {}
        self.opened: list[_RedisProtocol] = []
        self.lock = _DeferredLock()

    @inlineCallbacks
    def _conn(self, address: tuple[str, int]) -> Any:
        conn = self.conns.get(address)
        if conn is None or not conn.connected:
            conn = yield _redis_connect(reactor, address[0], address[1], timeout=2)
            if self.cluster.password:
                yield conn.command("AUTH", self.cluster.password)
            self.conns[address] = conn
            self.opened.append(conn)
        return conn

    def publish(self, channel: str, data: bytes) -> Deferred[int]:
        """One at a time, in order."""
        return self.lock.run(self._publish, channel, data)

    @inlineCallbacks
    def _publish(self, channel: str, data: bytes) -> Any:
        for _ in range(10):
            address = self.route.get(channel)
            if address is None:
                address = self.route[channel] = ("127.0.0.1", self.cluster.owner(channel))
            try:
                conn = yield self._conn(address)
                receivers = yield conn.command("SPUBLISH", channel, data)
                return receivers
            except _RedisError as exc:
                kind, _, rest = str(exc).partition(" ")
                if kind == "MOVED":
                    host, _, port = rest.split()[1].rpartition(":")
                    self.route[channel] = (host, int(port))
                elif kind in ("CLUSTERDOWN", "TRYAGAIN"):
                    yield sleep(0.2)
                else:
                    raise
            except Exception:
                self.route.pop(channel, None)
        raise AssertionError(f"could not publish to {channel}")

    def refresh(self) -> None:
        self.route.clear()

    def close(self) -> Deferred[Any]:
        waits = []
        for conn in self.opened:
            waits.append(_closed(conn))
            if conn.connected and conn.transport is not None:
                conn.transport.loseConnection()
        return _gatherResults(waits)


class SilentServer:
    """A loopback TCP server that accepts connections and never answers
    (a Redis or a key-set URL that hangs). ``lost`` fires when the first
    accepted connection goes away; cleanup aborts the rest and stops it."""

    def __init__(self, test: TestCase) -> None:
        from twisted.internet.protocol import Factory, Protocol

        server = self
        self.accepted: list[Any] = []
        self.lost: Deferred[None] = Deferred()

        class Silent(Protocol):
            def connectionMade(self) -> None:
                server.accepted.append(self)

            def connectionLost(self, reason: Any = None) -> None:
                if not server.lost.called:
                    server.lost.callback(None)

        factory = Factory.forProtocol(Silent)
        factory.noisy = False
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.port: int = listening.getHost().port

        def stop() -> Any:
            for conn in self.accepted:
                conn.transport.abortConnection()
            return listening.stopListening()

        test.addCleanup(stop)
