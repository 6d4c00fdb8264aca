"""Redis connections shared by the classic bus and the publishers: where
Redis is (:class:`RedisAddress`, never showing the password), a RESP
connection that can be abandoned before it exists (:class:`Connection`),
and :class:`RedisPublisher`, the small publish API for producers written in
Python, the ``autogpt-ws publish`` command, the demo and the tests::

    publisher = RedisPublisher.from_settings(settings)
    yield publish.publish_event(publisher, layout, publish.node_event(...))
    yield publisher.close()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TCPTimedOutError, TimeoutError
from twisted.python.failure import Failure

from ..config import Settings, redis_address
from .resp import MessageHandler, RedisProtocol, connect, handshake


@dataclass(frozen=True)
class RedisAddress:
    host: str = "localhost"
    port: int = 6379
    username: str = ""
    password: str = field(default="", repr=False)
    db: int = 0
    tls: bool = False
    ca_file: str = ""
    timeout: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "RedisAddress":
        return cls(**redis_address(settings), ca_file=settings.redis_tls_ca_file,
                   timeout=settings.redis_connect_timeout)

    def __str__(self) -> str:
        """For logs and /ready: never the password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"

    def connect(self, reactor: Any, protocol: RedisProtocol) -> Deferred[RedisProtocol]:
        return connect(reactor, self.host, self.port, timeout=self.timeout, tls=self.tls,
                       ca_file=self.ca_file, protocol=protocol)


class Connection(RedisProtocol):
    """A RESP connection that can be given up before it exists: when it is
    abandoned (the bus stopped, the attempt timed out) a late connect is
    closed as soon as it is made.

    ``RedisProtocol.lost`` fires on its errback path (it is given a
    Failure); this class consumes it at once, so no loss is ever reported as
    an unhandled error, and offers :meth:`when_lost` and :meth:`closed`."""

    abandoned = False
    abort_reason = ""

    def __init__(self, on_message: MessageHandler | None = None) -> None:
        super().__init__(on_message)
        self.reason: Failure | None = None
        self._on_lost: list[Callable[[Failure], None]] = []
        self.lost.addBoth(self._gone)

    def _gone(self, reason: Failure) -> None:
        self.reason = reason
        watchers, self._on_lost = self._on_lost, []
        for watcher in watchers:
            watcher(reason)

    def when_lost(self, watcher: Callable[[Failure], None]) -> None:
        if self.reason is not None:
            watcher(self.reason)
        else:
            self._on_lost.append(watcher)

    def closed(self) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.when_lost(lambda _: done.callback(None))
        return done

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.abandoned:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        keepalive = getattr(self.transport, "setTcpKeepAlive", None)
        if keepalive is not None:
            keepalive(1)

    def abandon(self, reason: str = "") -> Deferred[None]:
        """Close now, or as soon as it connects; fires once closed (at once
        when it never connected)."""
        self.abandoned = True
        self.abort_reason = self.abort_reason or reason
        if self.transport is not None and self.reason is None and self.connected:
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return self.closed()
        return succeed(None)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, DNSLookupError):
        return "host name not found"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TCPTimedOutError, TimeoutError)):
        return "connection timed out"
    return str(exc) or exc.__class__.__name__


class RedisPublisher:
    """``PUBLISH`` (or ``SPUBLISH`` when ``sharded``), or any other command,
    on one connection, opened on first use and again after it is lost.  A publish fires with
    Redis's receiver count, or fails (Redis down, an error reply); it is
    never retried, so never delivered twice.  Publishes go out in call order.
    """

    def __init__(self, address: RedisAddress, reactor: Any, sharded: bool = False,
                 name: str = "autogpt-ws-publisher") -> None:
        self.address = address
        self.reactor = reactor
        self.verb = "SPUBLISH" if sharded else "PUBLISH"
        self.name = name
        self._conn: Connection | None = None
        self._pending: Connection | None = None
        self._connecting: Deferred[Any] | None = None
        self._waiters: list[Deferred[Connection]] = []

    @classmethod
    def from_settings(cls, settings: Settings, reactor: Any = None, sharded: bool = False) -> "RedisPublisher":
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        return cls(RedisAddress.from_settings(settings), reactor, sharded)

    def publish(self, channel: str, data: bytes) -> Deferred[int]:
        return self.command(self.verb, channel, data)

    def command(self, *args: str | bytes | int) -> Deferred[Any]:
        """Any command on this connection (opened if need be), in call order."""
        conn = self._conn
        if conn is not None and conn.reason is None:
            return conn.command(*args)
        waiter: Deferred[Connection] = Deferred()
        self._waiters.append(waiter)
        if self._pending is None:
            self._open()
        return waiter.addCallback(lambda c: c.command(*args))

    @inlineCallbacks
    def _open(self) -> Any:
        conn = self._pending = Connection()
        try:
            self._connecting = self.address.connect(self.reactor, conn)
            yield self._connecting
            self._connecting = None
            yield handshake(conn, self.address.username, self.address.password, self.address.db, self.name)
        except Exception as exc:
            conn.abandon()
            if self._pending is conn:
                self._pending = self._connecting = None
                waiters, self._waiters = self._waiters, []
                for waiter in waiters:
                    waiter.errback(ConnectionError(f"cannot publish to {self.address}: {describe_error(exc)}"))
            return
        if self._pending is not conn:  # closed meanwhile
            conn.abandon()
            return
        while self._waiters:  # in call order, including publishes made meanwhile
            self._waiters.pop(0).callback(conn)
        self._pending = None
        self._conn = conn
        conn.when_lost(lambda _: self._forget(conn))

    def _forget(self, conn: Connection) -> None:
        if self._conn is conn:
            self._conn = None

    def close(self) -> Deferred[None]:
        """Close the connection (and any attempt); waiting publishes fail."""
        conn, self._conn = self._conn, None
        pending, self._pending = self._pending, None
        if self._connecting is not None and not self._connecting.called:
            self._connecting.cancel()
        self._connecting = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(ConnectionError("publisher closed"))
        closing = [c.abandon("closed") for c in (conn, pending) if c is not None]
        return DeferredList(closing).addCallback(lambda _: None)
