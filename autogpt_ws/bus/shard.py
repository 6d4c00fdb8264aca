"""One subscriber connection to one shard node (a cluster master).

A :class:`ShardLink` holds the channels the cluster bus placed on its node
and keeps the node's view equal to that set: ``SSUBSCRIBE`` when a channel
is added, ``SUNSUBSCRIBE`` when removed, everything again after a
reconnect (backoff 0.5 s doubling to 8 s, with jitter).  When the node
refuses a channel (``MOVED``, ``CLUSTERDOWN``) or drops it on its own (a
server-sent ``sunsubscribe``: the slot moved), the channel leaves the link
and the bus is told, so it can place it on the new owner: a channel is held
by at most one link.  A link delivers messages only for channels it holds,
so a late message from a former owner is never delivered twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import Settings, redis_address
from ..stats import Stats
from .resp import RedisError, RedisProtocol, connect, handshake
from .slots import Address, format_address, parse_address

log = Logger()

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 8.0


def backoff(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Delay before retry ``attempt`` (1-based): 0.5 s doubling to 8 s, +-20 %."""
    base = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, attempt - 1))
    return base * (0.8 + 0.4 * rng())


def closed(proto: RedisProtocol) -> Deferred[str]:
    """Fires with the reason (text) once ``proto``'s connection is gone.
    ``RedisProtocol.lost`` fires on its errback path; this consumes it."""
    done: Deferred[str] = Deferred()
    proto.lost.addBoth(lambda reason: done.callback(
        reason.getErrorMessage() if isinstance(reason, Failure) else "closed"))
    return done


@inlineCallbacks
def hang_up(conn: RedisProtocol, deadline: Any) -> Any:
    """End a short-lived connection once its answer is in (or it failed):
    aborted, not closed, since over TLS a close waits for the peer's
    close_notify, which a peer may never send; ``deadline`` (the
    connection's abort timer) is kept until the connection is gone."""
    gone = closed(conn)
    if conn.connected and conn.transport is not None:
        conn.transport.abortConnection()
    yield gone
    if deadline.active():
        deadline.cancel()


def moved_target(error: str) -> tuple[int, Address] | None:
    """``MOVED 1234 host:port`` -> (1234, (host, port)); None for other errors."""
    parts = error.split()
    if len(parts) == 3 and parts[0] == "MOVED" and parts[1].isdigit():
        try:
            return int(parts[1]), parse_address(parts[2])
        except ValueError:
            return None
    return None


class LinkOwner(Protocol):
    """The cluster bus, as a link sees it."""

    def deliver(self, channel: str, data: bytes) -> None: ...

    def channel_confirmed(self, link: "ShardLink", channel: str) -> None: ...

    def channel_lost(self, link: "ShardLink", channel: str, moved: tuple[int, Address] | None) -> None: ...

    def link_down(self, link: "ShardLink") -> None: ...


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach and log in to any node of the cluster (no db: always 0)."""

    tls: bool
    ca_file: str
    timeout: float
    username: str
    password: str
    name: str = "autogpt-ws-cluster"

    @classmethod
    def from_settings(cls, settings: Settings) -> "ConnectOptions":
        """TLS and credentials as the classic address has them (REDIS_URL
        included): every node of a cluster takes the same."""
        address = redis_address(settings)
        return cls(address["tls"], settings.redis_tls_ca_file, settings.redis_connect_timeout,
                   address["username"], address["password"])


class ShardLink:
    def __init__(self, address: Address, owner: LinkOwner, reactor: Any, options: ConnectOptions,
                 stats: Stats, *, ping_interval: float = 15.0, ping_timeout: float = 10.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.address = address
        self.owner = owner
        self.reactor = reactor
        self.options = options
        self.stats = stats
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.rng = rng
        self.channels: set[str] = set()  # placed here by the bus
        self.acked: set[str] = set()  # of those, confirmed by the node on this connection
        self.conn: RedisProtocol | None = None
        self._live: set[RedisProtocol] = set()  # TCP connected, not yet closed
        self.failures = 0
        self._attempt: Deferred[Any] | None = None
        self._opening: RedisProtocol | None = None
        self._retry: Any = None
        self._ping_call: Any = None
        self._ping_deadline: Any = None
        self._stopping = False
        self._down = False  # lost or never reached: log when it is back

    @property
    def name(self) -> str:
        return format_address(self.address)

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def unconfirmed(self) -> int:
        return len(self.channels) - len(self.acked)

    # -- what the bus asks ----------------------------------------------------

    def add(self, channel: str) -> None:
        self.channels.add(channel)
        if self.conn is not None:
            self._ssubscribe(self.conn, channel)

    def remove(self, channel: str) -> None:
        self.channels.discard(channel)
        self.acked.discard(channel)
        if self.conn is not None:
            self.conn.subscribe("SUNSUBSCRIBE", [channel]).addErrback(lambda _: None)

    def start(self) -> None:
        self._connect()

    def stop(self) -> Deferred[Any]:
        """Close the connection (or the attempt); fires once it is closed."""
        self._stopping = True
        for call in (self._retry, self._ping_call, self._ping_deadline):
            if call is not None and call.active():
                call.cancel()
        self.conn = None
        self.acked.clear()
        if self._attempt is not None and self._opening not in self._live:
            self._attempt.cancel()  # still connecting: cancel the TCP attempt
        waits = []
        for proto in tuple(self._live):
            # abort: a hung node must not hold the stop (a handshake in
            # progress fails with its connection)
            waits.append(closed(proto))
            if proto.transport is not None:
                proto.transport.abortConnection()
        return gatherResults(waits) if waits else succeed(None)

    # -- connection -----------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        opts = self.options
        proto = RedisProtocol(self._message, self._pushed)
        self._opening = proto
        d = connect(self.reactor, self.address[0], self.address[1], timeout=opts.timeout,
                    tls=opts.tls, ca_file=opts.ca_file, protocol=proto)
        d.addCallback(self._opened)
        d.addCallback(self._handshake)
        d.addCallbacks(self._connected, self._failed, callbackArgs=(proto,), errbackArgs=(proto,))
        self._attempt = d

    def _opened(self, proto: RedisProtocol) -> RedisProtocol:
        self._live.add(proto)
        closed(proto).addCallback(self._lost, proto)
        return proto

    def _handshake(self, proto: RedisProtocol) -> Deferred[Any]:
        """AUTH and CLIENT SETNAME, bounded: a node that accepts TCP but
        does not answer (stopped, overloaded) is dropped and retried."""
        opts = self.options
        deadline = self.reactor.callLater(opts.timeout, proto.transport.abortConnection)  # type: ignore[union-attr]

        def done(result: object) -> object:
            if deadline.active():
                deadline.cancel()
            return result

        return handshake(proto, opts.username, opts.password, 0, opts.name).addBoth(done)

    def _connected(self, _: Any, proto: RedisProtocol) -> None:
        self._attempt = self._opening = None
        if self._stopping:
            proto.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self._down:
            log.info("shard node {node} connected again ({failures} failed attempts); resubscribing {count} channels",
                     node=self.name, failures=self.failures, count=len(self.channels))
        self.failures = 0
        self._down = False
        self.conn = proto
        for channel in sorted(self.channels):
            self._ssubscribe(proto, channel)
        self._schedule_ping()

    def _failed(self, failure: Failure, proto: RedisProtocol) -> None:
        self._attempt = self._opening = None
        if proto.connected and proto.transport is not None:
            proto.transport.abortConnection()
        if self._stopping:
            return
        self.failures += 1
        self._down = True
        delay = backoff(self.failures, self.rng)
        log.warn("shard node {node} unreachable ({error}); retry {attempt} in {delay:.1f}s",
                 node=self.name, error=failure.getErrorMessage(), attempt=self.failures, delay=delay)
        self._retry = self.reactor.callLater(delay, self._connect)
        self.owner.link_down(self)

    def _lost(self, reason: str, proto: RedisProtocol) -> None:
        self._live.discard(proto)
        if self.conn is not proto:
            return
        self.conn = None
        self.acked.clear()
        for call in (self._ping_call, self._ping_deadline):
            if call is not None and call.active():
                call.cancel()
        if self._stopping:
            return
        self.stats.bus_reconnects += 1
        self._down = True
        delay = backoff(1, self.rng)
        log.warn("lost shard node {node} ({error}); {count} channels to resubscribe in {delay:.1f}s",
                 node=self.name, error=reason, count=len(self.channels), delay=delay)
        self._retry = self.reactor.callLater(delay, self._connect)
        self.owner.link_down(self)

    # -- keepalive: a node that hangs (no RST) is noticed ----------------------

    def _schedule_ping(self) -> None:
        if self.ping_interval > 0:
            self._ping_call = self.reactor.callLater(self.ping_interval, self._ping)

    def _ping(self) -> None:
        conn = self.conn
        if conn is None:
            return
        self._ping_deadline = self.reactor.callLater(self.ping_timeout, self._ping_late, conn, conn.reads)

        def answered(result: object) -> None:
            if self._ping_deadline is not None and self._ping_deadline.active():
                self._ping_deadline.cancel()
            if self.conn is conn:
                self._schedule_ping()

        conn.command("PING").addBoth(answered)

    def _ping_late(self, conn: RedisProtocol, reads: int) -> None:
        if conn.reads != reads:  # the answer waits behind a backlog still being read: alive
            self._ping_deadline = self.reactor.callLater(self.ping_timeout, self._ping_late, conn, conn.reads)
            return
        log.warn("shard node {node} did not answer PING in {timeout}s; reconnecting",
                 node=self.name, timeout=self.ping_timeout)
        if conn.transport is not None:
            conn.transport.abortConnection()

    # -- subscriptions --------------------------------------------------------

    def _ssubscribe(self, conn: RedisProtocol, channel: str) -> None:
        d = conn.subscribe("SSUBSCRIBE", [channel])
        d.addCallbacks(self._subscribed, self._refused, callbackArgs=(conn, channel), errbackArgs=(conn, channel))

    def _subscribed(self, _: Any, conn: RedisProtocol, channel: str) -> None:
        if conn is self.conn and channel in self.channels:
            self.acked.add(channel)
            self.owner.channel_confirmed(self, channel)

    def _refused(self, failure: Failure, conn: RedisProtocol, channel: str) -> None:
        if not failure.check(RedisError) or conn is not self.conn or channel not in self.channels:
            return  # connection lost: resubscribed on reconnect; or no longer wanted here
        error = failure.getErrorMessage()
        log.info("shard node {node} refused {channel}: {error}", node=self.name, channel=channel, error=error)
        self.channels.discard(channel)
        self.acked.discard(channel)
        self.owner.channel_lost(self, channel, moved_target(error))

    def _pushed(self, reply: list[Any]) -> None:
        """Redis drops shard channels of a slot the node no longer owns and
        says so with an unsolicited ``sunsubscribe``."""
        if reply[0] != b"sunsubscribe" or len(reply) < 2 or not isinstance(reply[1], bytes):
            return
        channel = reply[1].decode("utf-8", "replace")
        if channel not in self.channels:
            return  # the late ack of our own SUNSUBSCRIBE
        log.info("shard node {node} dropped {channel} (slot moved)", node=self.name, channel=channel)
        self.channels.discard(channel)
        self.acked.discard(channel)
        self.owner.channel_lost(self, channel, None)

    def _message(self, channel: bytes, data: bytes) -> None:
        name = channel.decode("utf-8", "replace")
        if name in self.channels:
            self.owner.deliver(name, data)
        else:
            self.stats.events_dropped["not_held"] += 1
