"""The Autobahn factory: protocol options from settings, the set of open
sockets, admission at the upgrade, and closing every socket on shutdown."""

from __future__ import annotations

from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from .. import __version__
from ..config import Settings
from ..core.hub import Hub
from ..core.session import Catchup, Session, SubscriptionGate
from ..origins import OriginList
from ..stats import Stats
from .auth import TokenVerifier
from .deflate import Deflaters, acceptor
from .flush import Flusher
from .keepalive import Keepalive
from .protocol import CLOSE_GOING_AWAY, ServerProtocol

log = Logger()

# twisted.internet.abstract.FileDescriptor.bufferSize: a transport asks its
# producer to pause once this much is buffered.
TRANSPORT_BUFFER = 2 ** 16

# seconds a client has to answer our close frame before the socket is aborted
CLOSE_HANDSHAKE_TIMEOUT = 3.0


class _Call:
    """A pending call whose cancel() is safe to repeat."""

    __slots__ = ("_call",)

    def __init__(self, call: IDelayedCall) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class ExactTimer:
    """Autobahn's protocol timers (the opening and closing handshake
    timeouts; its auto-ping is off, :mod:`keepalive` pings) on plain
    ``callLater``.  txaio's batched timer, Autobahn's default, floors every
    deadline to a whole second (``int(now + delay)``): a 1 s closing
    handshake timeout can fire at once and abort a socket before its close
    frame is written, and cancelled timers leave their bucket's call pending."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any, **kwargs: Any) -> _Call:
        return _Call(self._reactor.callLater(delay, func, *args, **kwargs))


def deflate_bound(size: int) -> int:
    """The most ``size`` bytes can take deflated (zlib's compressBound)."""
    return size + (size >> 12) + (size >> 14) + (size >> 25) + 13


class Admission:
    """Checks made before authentication: capacity and the Origin policy."""

    def __init__(self, settings: Settings, open_count: Callable[[], int]) -> None:
        self._max = settings.max_connections
        self._open_count = open_count
        self._origins = OriginList(settings.ws_allowed_origins)
        self._allow_missing = settings.ws_allow_missing_origin

    def refuse(self, request: ConnectionRequest) -> ConnectionDeny | None:
        # the socket asking is already counted
        if self._max and self._open_count() > self._max:
            return _deny(503, "Service Unavailable", "capacity")
        if self._origins:
            origin = request.origin  # "" when the header is absent
            if not origin:
                if not self._allow_missing:
                    return _deny(403, "Forbidden", "origin_missing")
            elif not self._origins.allows(origin):
                # "null" (sandboxed frames, file://) is a browser's origin,
                # not a missing one: refused unless listed
                return _deny(403, "Forbidden", "origin")
        return None


def _deny(code: int, reason: str, label: str) -> ConnectionDeny:
    deny = ConnectionDeny(code, reason)
    deny.label = label  # type: ignore[attr-defined]
    return deny


def options_on_class(base: type[ServerProtocol], factory: WebSocketServerFactory) -> type[ServerProtocol]:
    """A protocol class carrying the factory's options as class attributes.

    Autobahn copies its ~30 protocol options onto every connection unless
    the protocol already has them; on the class they cost nothing per
    socket (part of the memory per idle socket: docs/performance.md)."""
    options: dict[str, Any] = {}
    for name in base.CONFIG_ATTRS:
        value = getattr(factory, name)
        options[name] = staticmethod(value) if callable(value) else value
    return type(base.__name__, (base,), options)


class WebsocketFactory(WebSocketServerFactory):
    protocol = ServerProtocol
    transport_buffer = TRANSPORT_BUFFER

    def __init__(self, settings: Settings, hub: Hub, stats: Stats, verifier: TokenVerifier,
                 reactor: Any, catchup: Catchup | None = None,
                 gate: Callable[[], SubscriptionGate | None] = lambda: None) -> None:
        super().__init__(server=f"autogpt-ws/{__version__}", reactor=reactor)
        self.settings = settings
        self.hub = hub
        self.stats = stats
        self.verifier = verifier
        self.clock = reactor
        self.catchup = catchup
        self.gate = gate
        self.sockets: set[ServerProtocol] = set()
        self._drained: list[Deferred[None]] = []
        self.admission = Admission(settings, lambda: len(self.sockets))
        self._batched_timer = ExactTimer(reactor)
        self.flusher = Flusher(reactor)
        self.keepalive = Keepalive(reactor, settings.ping_interval, settings.ping_timeout)
        self.deflaters = Deflaters(settings.deflate_level, settings.deflate_threshold, settings.deflate_history, stats)
        limit = settings.max_inbound_frame
        self.setProtocolOptions(
            webStatus=False,
            versions=[13],  # RFC 6455 only (Autobahn also speaks hybi-10, version 8)
            allowNullOrigin=True,  # the Origin policy is ours (Admission): "null" is refused there unless listed
            # the protocol bounds a message exactly, before inflating or
            # after; Autobahn checks each frame on the wire, and its own
            # message count mixes compressed and inflated sizes: off
            maxFramePayloadSize=deflate_bound(limit) if settings.permessage_deflate else limit,
            maxMessagePayloadSize=0,
            autoPingInterval=0,  # our Keepalive pings: one timer for every socket
            openHandshakeTimeout=settings.open_handshake_timeout,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            failByDrop=False,
            tcpNoDelay=True,
            # offers are sifted first: ServerProtocol.onConnect
            perMessageCompressionAccept=acceptor(limit, keyed=settings.deflate_history > 0),
        )
        self.protocol = options_on_class(ServerProtocol, self)


    def startFactory(self) -> None:
        super().startFactory()
        self.keepalive.start()

    def stopFactory(self) -> None:
        self.keepalive.stop()
        super().stopFactory()

    def session_for(self, proto: ServerProtocol) -> Session:
        s = self.settings
        return Session(proto, self.hub, self.stats, proto.send_reply, s.max_subscriptions_per_socket,
                       self.catchup, self.gate, s.execution_not_found_reply)

    # -- shutdown -------------------------------------------------------------

    def socket_closed(self, proto: ServerProtocol) -> None:
        if not self.sockets and self._drained:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                waiter.callback(None)

    def close_all(self, timeout: float) -> Deferred[None]:
        """Close every socket with 1001; abort those still open after
        ``timeout`` seconds. Fires when none is left."""
        if not self.sockets:
            return succeed(None)
        count = len(self.sockets)
        log.info("closing {count} sockets (1001), waiting up to {timeout}s", count=count, timeout=timeout)
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        for proto in tuple(self.sockets):
            proto.close(CLOSE_GOING_AWAY, "server shutting down")

        def abort_rest() -> None:
            left = tuple(self.sockets)
            if left:
                log.warn("aborting {count} sockets that did not close in time", count=len(left))
            for proto in left:
                proto.abort()

        timer = self.clock.callLater(timeout, abort_rest)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return drained.addBoth(stop_timer)
