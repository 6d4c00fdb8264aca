"""The Autobahn server protocol: handshake, frame dispatch, pushes, close.

Everything protocol-level lives in :mod:`session` and :mod:`wire`; this
module is the transport side: authenticate at the upgrade, feed frames to
the session strictly in order, write pushed frames (raw, framed once, when
the socket does not compress), watch the send buffer, and close with the
right code.

Backpressure: the socket is its transport's streaming producer, so the
transport tells it (``pauseProducing``) when more than its buffer size
(64 KiB, or ``max_send_buffer`` if smaller) is unsent, and
``resumeProducing`` once all is written.  Only while paused is the unsent
output measured; a frame (push or reply) due while it exceeds
``max_send_buffer`` closes the socket 1013 ``slow consumer`` and aborts it
instead of being written.  So one socket holds at most ``max_send_buffer``
plus one frame (a frame larger than the bound is written when the buffer is
under it), and the other sockets never wait for a slow one.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol as _WS
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.tcp import Connection as TCPConnection
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import lazylog
from .auth import AuthFailure, Identity
from .flush import send_direct
from .limits import TokenBucket, descriptor_of, unsent_bytes
from .metrics import close_code_label
from .session import Session
from .wire import ERR_RATE_LIMITED, OutFrame, error, ws_text_frame

if TYPE_CHECKING:
    from .factory import WebsocketFactory

log = Logger()
lazylog.install()

STATE_OPEN = _WS.STATE_OPEN

# Autobahn state needed only to answer the upgrade; dropped once open to
# keep idle sockets small.
HANDSHAKE_ONLY = (
    "http_headers", "http_request_data", "http_response_data", "http_status_line",
    "http_request_params", "http_request_host", "http_request_path", "http_request_uri",
    "_wskey", "websocket_protocols", "websocket_extensions", "websocket_origin",
)


class SendQueue(list):  # type: ignore[type-arg]
    """Autobahn's queue for synchronous sends (which we never use): an
    empty list is ~60 bytes, an empty deque ~760."""

    def popleft(self) -> Any:
        return self.pop(0)


CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013

RATE_LIMITED = error(ERR_RATE_LIMITED)


class ServerProtocol(WebSocketServerProtocol):
    factory: "WebsocketFactory"

    user_id: str = ""
    _expires_at: float | None = None  # the token's exp
    _denied: AuthFailure | None = None
    _expiry: IDelayedCall | None = None
    _session: Session | None = None
    _attached = False
    _deflate = False
    _paused = False
    _backlog = 0  # bytes written while paused, when the buffer cannot be read
    _descriptor: Any = None  # the file descriptor buffering our output
    _busy: Deferred[None] | None = None
    _inbox: deque[bytes] | None = None
    _bucket: TokenBucket | None = None
    _out: list[bytes] | None = None  # frames pushed this reactor turn, not yet written
    _queued = 0  # their bytes
    _plain_tcp = False  # the transport is a bare TCP socket (no TLS wrapper)
    _room = 0  # bytes the bound allowed when the first of them was queued

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.send_queue = SendQueue()
        self.keys: set[str] = set()
        self.factory.sockets.add(self)
        # twisted.web's HTTPChannel registered itself as the producer of this
        # transport before WebSocketResource took the transport over; we are
        # the producer now, so pauses tell us our client is not reading.
        transport: Any = self.transport
        transport.unregisterProducer()  # a no-op when none is registered
        transport.registerProducer(self, True)
        self._plain_tcp = isinstance(transport, TCPConnection)
        descriptor = self._descriptor = descriptor_of(transport)
        bound = self.factory.settings.max_send_buffer
        if descriptor is not None and descriptor.bufferSize > bound:
            descriptor.bufferSize = bound  # pause us, and so check, below the bound

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        factory = self.factory
        factory.sockets.discard(self)
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        if self.closeHandshakeTimeoutCall is not None:  # Autobahn leaves it pending
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        if self._attached:
            self._attached = False
            factory.hub.detach(self)
            stats = factory.stats
            stats.open_sockets -= 1
            # the code of whoever started the close (1006: no closing handshake)
            code = self.localCloseCode if self.closedByMe else self.remoteCloseCode
            stats.sockets_closed[close_code_label(code)] += 1
        self._inbox = None
        self._out = None
        # Break the two reference cycles a socket is part of (its session's
        # sink is this protocol; Autobahn resolves is_closed with this
        # protocol), so that a closed socket and everything it holds are freed
        # at once by reference counting: no garbage for a full collection to
        # find (it used to be ~20 objects per socket), and memory back at
        # once after a reconnect storm.  Nothing reads either after a close.
        self._session = None
        self.is_closed = None
        factory.socket_closed(self)

    # IPushProducer: the transport tells us when its buffer fills and drains

    def pauseProducing(self) -> None:
        self._paused = True
        self._backlog = 0

    def resumeProducing(self) -> None:
        self._paused = False

    def stopProducing(self) -> None:
        pass

    def unsent(self) -> int:
        """Bytes written to this socket and not yet taken by the kernel
        (an estimate above the transport's buffer size when the transport's
        buffer cannot be read)."""
        if self._descriptor is not None:
            return unsent_bytes(self._descriptor)
        return self.factory.transport_buffer + self._backlog if self._paused else 0

    def _over_limit(self) -> bool:
        """Called only while paused: is the unsent output over the bound?"""
        if self.unsent() > self.factory.settings.max_send_buffer:
            self._slow_consumer()
            return True
        return False

    # -- handshake ----------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Deferred[None] | None:
        factory = self.factory
        refusal = factory.admission.refuse(request)
        if refusal is not None:
            factory.stats.handshakes_refused[getattr(refusal, "label", str(refusal.code))] += 1
            raise refusal
        # Autobahn's request.params drops blank values; "token=x&token=" must
        # read as the empty (missing) last token, as the AutoGPT server does
        query = urlsplit(self.http_request_uri).query
        token = (parse_qs(query, keep_blank_values=True).get("token") or [None])[-1]
        verify_now = getattr(factory.verifier, "verify_now", None)
        if verify_now is not None:  # no wait: no Deferred either
            try:
                self._authenticated(verify_now(token))
            except Exception:
                self._auth_failed(Failure())  # raises ConnectionDeny with auth_failure=http
            return None
        d = factory.verifier.verify(token)
        d.addCallbacks(self._authenticated, self._auth_failed)
        if not d.called:
            self._while_verifying(d)
        return d

    def _while_verifying(self, verified: Deferred[None]) -> None:
        """While the token is being verified (a key-set fetch): bytes the
        client sends are kept for after the handshake, up to one largest
        frame, beyond which the socket is aborted (Autobahn would keep them
        all, and search them for another request head on every read); and
        a client gone by the time the answer comes is never opened (it would
        stay attached to the hub, with its timers running)."""
        self.dataReceived = self._early_data  # type: ignore[method-assign]

        def settle(result: object) -> object:
            self.__dict__.pop("dataReceived", None)
            if self.state == _WS.STATE_CLOSED:
                raise ConnectionDeny(400, "client went away")
            return result

        verified.addBoth(settle)

    def _early_data(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > self.factory.settings.max_inbound_frame + 14:  # 14: the largest frame header
            log.info("a client sent {size} bytes before its upgrade was answered: aborting", size=len(self.data))
            self.abort()

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """An unsupported Sec-WebSocket-Version is answered ``426 Upgrade
        Required`` with the version we speak (RFC 6455 section 4.4);
        Autobahn answers 400."""
        if responseHeaders and responseHeaders[0][0] == "Sec-WebSocket-Version":
            code = 426
        super().failHandshake(reason, code, responseHeaders)

    def _authenticated(self, identity: Identity) -> None:
        self.user_id = identity.user_id
        self._expires_at = identity.expires_at

    def _auth_failed(self, failure: Failure) -> None:
        if failure.check(AuthFailure):
            exc: AuthFailure = failure.value
        else:  # a verifier bug must not answer HTTP 500 with its text
            log.failure("token verification failed inside the server", failure)
            exc = AuthFailure(4003, "Invalid token", "internal")
        self.factory.stats.auth_failures[exc.detail or str(exc.code)] += 1
        log.info("authentication failed ({detail}), close {code}", detail=exc.detail, code=exc.code)
        if self.factory.settings.auth_failure == "http":
            raise ConnectionDeny(403, "Forbidden")
        self._denied = exc

    def onOpen(self) -> None:
        factory = self.factory
        attributes = self.__dict__
        for name in HANDSHAKE_ONLY:
            attributes.pop(name, None)
        if self._denied is not None:
            self.sendClose(self._denied.code, self._denied.reason)
            return
        self._deflate = self._perMessageCompress is not None
        settings = factory.settings
        # with auth disabled every socket is the same user: no per-user cap
        per_user = settings.max_connections_per_user if settings.enable_auth else 0
        if per_user and factory.hub.user_sockets(self.user_id) >= per_user:
            factory.stats.handshakes_refused["per_user"] += 1
            self.close(CLOSE_POLICY, "too many connections")
            return
        factory.hub.attach(self)
        self._attached = True
        factory.stats.open_sockets += 1
        factory.stats.sockets_opened += 1
        self._session = factory.session_for(self)
        if settings.rate_limit:
            self._bucket = TokenBucket(settings.rate_limit, settings.rate_burst, factory.clock.seconds())
        self._schedule_expiry()

    def _schedule_expiry(self) -> None:
        settings = self.factory.settings
        expires_at = self._expires_at
        if expires_at is None or not settings.token_expiry_close:
            return
        clock = self.factory.clock
        delay = max(0.0, expires_at + settings.token_expiry_grace - clock.seconds())
        self._expiry = clock.callLater(delay, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        log.info("token expired, closing socket of user {user_id}", user_id=self.user_id)
        self.close(4003, "Token expired")

    # -- inbound ------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._session is None or self.state != STATE_OPEN:
            return  # unauthenticated or closing: no frame but the close is sent
        if isBinary:
            self.close(CLOSE_UNSUPPORTED, "binary frames are not supported")
            return
        if not self._admit():
            return
        if self._busy is not None:
            if self._inbox is None:
                self._inbox = deque()
            self._inbox.append(payload)
            return
        self._dispatch(payload)

    def _admit(self) -> bool:
        """Token bucket on client frames: beyond the burst an error reply,
        ``rate_abuse_close`` refusals in a row close 1008."""
        bucket = self._bucket
        if bucket is None or bucket.take(self.factory.clock.seconds()):
            return True
        self.factory.stats.rate_limited += 1
        if bucket.refused >= self.factory.settings.rate_abuse_close:
            log.info("rate limit abused: closing socket of user {user_id}", user_id=self.user_id)
            self.close(CLOSE_POLICY, "rate limit exceeded")
        else:
            self.send_reply(RATE_LIMITED)
        return False

    def _dispatch(self, payload: bytes) -> None:
        session = self._session
        while session is not None:
            try:
                pending = session.handle(payload)
            except Exception:
                pending = None
                self._handler_failed(Failure())
            if pending is not None:
                self._busy = pending
                pending.addErrback(self._handler_failed)
                pending.addBoth(self._resume)
                return
            if not self._inbox or self._busy is not None:
                return
            payload = self._inbox.popleft()
            session = self._session

    def _resume(self, _: object) -> None:
        self._busy = None
        if self._inbox:
            self._dispatch(self._inbox.popleft())

    def _handler_failed(self, failure: Failure) -> None:
        # no reply for this frame; the socket stays usable
        self.factory.stats.handler_errors += 1
        log.failure("failed to handle a frame of user {user_id}", failure, user_id=self.user_id)

    def send_reply(self, payload: bytes) -> None:
        """A reply to this socket's frame: framed here (one unmasked text
        frame, as Autobahn would) unless the socket compresses."""
        if self.state == STATE_OPEN and not (self._paused and self._over_limit()):
            self.factory.stats.replies_out += 1
            if self._deflate:
                self.sendMessage(payload)
            else:
                self.sendData(ws_text_frame(payload))

    # -- outbound -----------------------------------------------------------

    def push(self, frame: OutFrame) -> None:
        """Write a frame built for many sockets: its shared framing, queued
        for one write per reactor turn on plain TCP (:mod:`flush`); written
        at once while the client is behind, or compressed per socket."""
        if self.state != STATE_OPEN or (self._paused and self._over_limit()):
            return
        if self._deflate:
            self.sendMessage(frame.payload)
            if self._paused:
                self._backlog += len(frame.payload)
            return
        if self._paused:
            wire = frame.wire
            self.transport.write(wire)  # type: ignore[union-attr]
            self._backlog += len(wire)
            return
        wire = frame.wire
        out = self._out
        if out is None:
            self._out = [wire]
            self._queued = len(wire)
            # what is queued counts against the bound, with what the
            # transport already holds
            self._room = self.factory.settings.max_send_buffer - self.unsent()
            self.factory.flusher.mark(self)
        else:
            out.append(wire)
            self._queued += len(wire)
        if self._queued > self._room:
            self.flush()

    def flush(self) -> None:
        """Write what :meth:`push` queued, in one piece."""
        out = self._out
        if out is None:
            return
        self._out = None
        transport: Any = self.transport
        if transport is None or self.state == _WS.STATE_CLOSED:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        if self._plain_tcp:  # try the kernel first (never under TLS: it would bypass encryption)
            data = send_direct(transport, data)
        if data:
            transport.write(data)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Every frame Autobahn writes (the handshake answer, replies, pings,
        close) goes after the events already queued for this socket, and
        straight to the kernel on bare TCP when nothing is waiting."""
        if self._out is not None:
            self.flush()
        if self._plain_tcp and not sync and not chopsize:
            data = send_direct(self.transport, data)
            if not data:
                return
        super().sendData(data, sync, chopsize)

    def _slow_consumer(self) -> None:
        self.factory.stats.slow_consumer_closes += 1
        log.info("slow consumer: closing socket of user {user_id} ({unsent} bytes unsent)",
                 user_id=self.user_id, unsent=self.unsent())
        self.close(CLOSE_TRY_AGAIN, "slow consumer")
        # it does not read: the close frame would never get through
        self.abort()

    # -- closing ------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Close with any code, 1001/1003/1008/1009/1013 included (sendClose
        accepts only 1000 and 3000-4999)."""
        if self.state == STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"))
        elif self.state == _WS.STATE_CONNECTING:
            self.abort()

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None and self.state != _WS.STATE_CLOSED:
            transport.abortConnection()
