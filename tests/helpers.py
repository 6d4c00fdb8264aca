"""Real parts for tests: servers on loopback port 0, an Autobahn client,
signed JWTs, and a redis-server the tests start on a free port."""

from __future__ import annotations

import os
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
from autogpt_ws.service import WebsocketServer

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


class Client(WebSocketClientProtocol):
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

    def message(self, index: int, timeout: float = 5.0) -> Deferred[bytes]:
        """The index-th message received (0-based), when it arrives."""
        if index < len(self.messages):
            return succeed(self.messages[index])
        waiter: Deferred[bytes] = Deferred()
        self._waiters.append((index, waiter))
        waiter.addTimeout(timeout, reactor)
        return waiter

    def send(self, payload: bytes | str) -> None:
        self.sendMessage(payload.encode() if isinstance(payload, str) else payload)

    @inlineCallbacks
    def request(self, payload: bytes | str, timeout: float = 5.0) -> Any:
        """Send a frame and return the next message."""
        index = len(self.messages)
        self.send(payload)
        reply = yield self.message(index, timeout)
        return reply

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
        from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponse, PerMessageDeflateResponseAccept

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


# -- redis-server -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A real redis-server on a free loopback port, in its own directory."""

    def __init__(self, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SkipTest("redis-server is not installed (tests/run.sh installs it)")
        self.binary = binary
        self.port = port or free_port()
        self.extra = extra
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
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
