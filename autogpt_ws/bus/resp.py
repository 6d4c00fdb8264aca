"""A small RESP2 client protocol for Twisted, parsed by hiredis.

Why not a general Redis client: a subscriber connection needs only
AUTH/SELECT/PING and the (P|S)SUBSCRIBE family, its messages must reach the
router as raw bytes with no per-message Deferred or object, and the sharded
bus needs SSUBSCRIBE, server-pushed ``sunsubscribe`` and ``MOVED`` errors,
which the Twisted-native clients do not offer.  hiredis (the Redis project's
C parser) does the parsing; this module does the bookkeeping.

Commands are answered in order through Deferreds.  While subscribed, Redis
interleaves pushes with replies; messages (``message``, ``pmessage``,
``smessage``) go to ``on_message(channel, data)`` and subscription changes
the server makes on its own (a slot moved) go to ``on_push(reply)``.  An
exception from ``on_message`` is logged and the stream goes on.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Sequence

import hiredis
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# the most bytes handed to hiredis at once (see RedisProtocol.dataReceived)
FEED_SIZE = 8192
ACKS = frozenset((b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe", b"sunsubscribe"))


class RedisError(Exception):
    """An error reply, e.g. ``MOVED 1234 127.0.0.1:7001`` or ``WRONGPASS ...``."""


def encode(args: Sequence[str | bytes | int]) -> bytes:
    parts = []
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode("utf-8")
        elif isinstance(arg, int):
            arg = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"*%d\r\n" % len(parts) + b"".join(parts)


MessageHandler = Callable[[bytes, bytes], None]


def _ignore(channel: bytes, data: bytes) -> None:
    """The message handler of a connection that subscribes to nothing."""


class _Pending:
    __slots__ = ("deferred", "acks", "replies", "verb", "channels")

    def __init__(self, deferred: Deferred[Any], acks: int, verb: bytes | None = None,
                 channels: frozenset[bytes] = frozenset()) -> None:
        self.deferred = deferred
        self.acks = acks  # subscribe-family commands answer with one ack per channel
        self.replies: list[Any] = []
        # what an ack must say to count for this command (None: any ack);
        # keeps a server-pushed sunsubscribe from being taken for our own ack
        self.verb = verb
        self.channels = channels


class RedisProtocol(Protocol):
    def __init__(self, on_message: MessageHandler | None = None,
                 on_push: Callable[[list[Any]], None] | None = None) -> None:
        self._reader = hiredis.Reader()
        self._pending: deque[_Pending] = deque()
        self.on_message = on_message
        self.on_push = on_push
        # fires with the loss reason as a Failure, i.e. down the errback
        # path: watch it with addBoth (or addErrback), never addCallback
        self.lost: Deferred[Failure] = Deferred()
        self.connected = False
        self.reads = 0  # data arrivals: a keepalive PING's answer may wait behind a backlog

    # -- commands ---------------------------------------------------------

    def command(self, *args: str | bytes | int) -> Deferred[Any]:
        """Send one command; fires with its reply, or fails with RedisError."""
        return self._send(args, 0)

    def subscribe(self, verb: str, channels: Sequence[str | bytes]) -> Deferred[Any]:
        """(P|S)(UN)SUBSCRIBE; fires once every channel was acknowledged.
        Unsubscribing from nothing still gets one ack.  Only acks naming this
        verb (and one of these channels, when given) count; others, such as
        a ``sunsubscribe`` the server sends on its own, go to ``on_push``."""
        names = frozenset(c.encode("utf-8") if isinstance(c, str) else c for c in channels)
        return self._send((verb, *channels), max(1, len(channels)), verb.lower().encode("ascii"), names)

    def _send(self, args: Sequence[str | bytes | int], acks: int, verb: bytes | None = None,
              channels: frozenset[bytes] = frozenset()) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if not self.connected or self.transport is None:
            d.errback(ConnectionError("not connected to Redis"))
            return d
        self._pending.append(_Pending(d, acks, verb, channels))
        self.transport.write(encode(args))
        return d

    # -- replies ----------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        # hiredis compacts its buffer (a memmove of everything unread) each
        # time 1 KiB of it has been parsed, so one big feed costs time
        # quadratic in its size; slices of FEED_SIZE keep that copy small
        self.reads += 1
        size = len(data)
        feed = self._reader.feed
        for offset in range(0, size, FEED_SIZE):
            feed(data, offset, min(FEED_SIZE, size - offset))
            self._drain()

    def _drain(self) -> None:
        gets = self._reader.gets
        on_message = self.on_message or _ignore
        while True:
            reply = gets()
            if reply is False:
                return
            # pushes first: on a subscriber connection they are nearly all
            # there is.  (A list compared with b"..." is just unequal, so
            # CLUSTER SLOTS and the like fall through to _reply.)
            if type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage":
                channel, data = reply[2], reply[3]
            elif type(reply) is list and len(reply) == 3 and (reply[0] == b"message" or reply[0] == b"smessage"):
                channel, data = reply[1], reply[2]
            else:
                self._reply(reply)
                continue
            try:
                on_message(channel, data)
            except Exception:  # a bug must not cut the stream
                log.failure("handling a message from {channel!r} failed", channel=channel)

    def _reply(self, reply: Any) -> None:
        """Anything but a message: a subscribe-family ack (ours, or one the
        server sends on its own), or the answer to the oldest command."""
        if type(reply) is list and reply and type(reply[0]) is bytes and reply[0] in ACKS:
            if not self._ack(reply) and self.on_push is not None:
                self.on_push(reply)
            return
        self._answer(reply)

    def _ack(self, reply: list[Any]) -> bool:
        """Count a subscribe-family ack against the oldest waiting command."""
        if not self._pending or self._pending[0].acks == 0:
            return False
        head = self._pending[0]
        if head.verb is not None and (reply[0] != head.verb or (
                head.channels and len(reply) > 1 and reply[1] not in head.channels)):
            return False
        head.replies.append(reply)
        head.acks -= 1
        if head.acks == 0:
            self._pending.popleft()
            head.deferred.callback(head.replies)
        return True

    def _answer(self, reply: Any) -> None:
        if not self._pending:
            return  # nothing asked: ignore rather than crash
        pending = self._pending.popleft()
        if isinstance(reply, hiredis.ReplyError):
            pending.deferred.errback(RedisError(str(reply)))
        else:
            pending.deferred.callback(reply)

    def connectionLost(self, reason: Failure = Failure(ConnectionError("lost"))) -> None:
        self.connected = False
        pending, self._pending = self._pending, deque()
        for entry in pending:
            entry.deferred.errback(ConnectionError(f"Redis connection lost: {reason.getErrorMessage()}"))
        if not self.lost.called:
            self.lost.callback(reason)


class _OneShot(Factory):
    """connectProtocol's factory, without its "Starting factory" /
    "Stopping factory" lines on every (re)connect attempt."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def connect(reactor: Any, host: str, port: int, *, timeout: float = 5.0, tls: bool = False,
            ca_file: str = "", protocol: RedisProtocol | None = None) -> Deferred[RedisProtocol]:
    """Open a connection (TLS verified against ``host`` with service_identity
    when ``tls``); fires with the connected protocol."""
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if tls:
        from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

        trust: Any = platformTrust()
        if ca_file:
            with open(ca_file, "rb") as handle:
                trust = Certificate.loadPEM(handle.read())
        endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=trust), endpoint)
    return endpoint.connect(_OneShot(protocol or RedisProtocol()))


def handshake(conn: RedisProtocol, username: str = "", password: str = "", db: int = 0,
              name: str = "autogpt-ws") -> Deferred[Any]:
    """AUTH, SELECT and CLIENT SETNAME as configured; fails with RedisError
    (e.g. WRONGPASS) when Redis refuses."""
    steps: list[tuple[Any, ...]] = []
    if password:
        steps.append(("AUTH", username, password) if username else ("AUTH", password))
    if db:
        steps.append(("SELECT", db))
    steps.append(("CLIENT", "SETNAME", name))
    d: Deferred[Any] = Deferred()
    d.callback(None)
    for step in steps:
        d.addCallback(lambda _, step=step: conn.command(*step))
    return d
