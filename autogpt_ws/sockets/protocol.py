"""The Autobahn server protocol: handshake, inbound frames, dispatch, close.

Everything protocol-level lives in :mod:`session` and :mod:`wire`; this
module is the transport side: authenticate at the upgrade, bound every
frame the client sends, feed messages to the session strictly in order,
and close with the right code.  What the socket writes, and its bound,
is :mod:`outbound`.

Inbound bounds, per frame (:meth:`ServerProtocol.onFrameBegin`): every
frame a client sends but its close frame, pings, pongs and empty
continuation frames included, takes a token of the rate limit; a message
spans at most ``max_message_frames`` frames and carries at most
``max_inbound_frame`` bytes (a compressed one is inflated at most one byte
past that, then refused).  A client that breaks one is closed and then
ignored: the connection ends as soon as the close frame is written
(:meth:`Outbound._shut`).  The size and frame bounds hold while the server
waits for the client's close frame too (the client's data frames are read
then, and dropped): one that breaks them then is dropped at once.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol as _WS
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..core.session import Session
from ..core.wire import ERR_RATE_LIMITED, error, ws_text_frame
from ..stats import close_code_label
from . import deflate, lazylog
from .auth import AuthFailure, Identity
from .limits import TokenBucket
from .outbound import CLOSE_TRY_AGAIN, Outbound  # noqa: F401 (1013, with the other close codes)

if TYPE_CHECKING:
    from .host import SocketHost

log = Logger()
lazylog.install()

STATE_OPEN = _WS.STATE_OPEN

# Autobahn state needed only to answer the upgrade; dropped once open to
# keep idle sockets small.
HANDSHAKE_ONLY = (
    "http_headers", "http_request_data", "http_response_data", "http_status_line",
    "http_request_params", "http_request_host", "http_request_path", "http_request_uri",
    "_wskey", "websocket_protocols", "websocket_extensions", "websocket_origin",
    "websocket_extensions_in_use",
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

RATE_LIMITED = error(ERR_RATE_LIMITED)


class Refused(Enum):
    """In a socket's inbox: a message refused by the rate limit, answered
    in turn (PROTOCOL.md: each reply before the next frame is handled)."""

    MESSAGE = 0


REFUSED = Refused.MESSAGE


class ServerProtocol(Outbound, WebSocketServerProtocol):
    factory: "SocketHost"

    user_id: str = ""
    _expires_at: float | None = None  # the token's exp
    _denied: AuthFailure | None = None
    _expiry: IDelayedCall | None = None
    _session: Session | None = None
    _attached = False
    _deflater: deflate.Deflater | None = None  # the parameter set of a compressing socket
    _busy: Deferred[None] | None = None
    _inbox: deque[bytes | Refused] | None = None  # messages waiting while a handler waits
    _bucket: TokenBucket | None = None
    # the message being received: its continuation frames so far, and
    # whether one of its frames was over the rate limit
    _continuations = 0
    _refused = False
    _skip_pong = False  # the ping being received was over the rate limit

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.send_queue = SendQueue()
        self.keys: set[str] = set()
        self.factory.sockets.add(self)
        self._watch_output()

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
            factory.keepalive.remove(self)
            factory.hub.detach(self)
            stats = factory.stats
            stats.open_sockets -= 1
            # the code of whoever started the close (1006: no close frame,
            # or the client's had no status code)
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

    # -- handshake ----------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Deferred[None] | None:
        factory = self.factory
        # what Autobahn negotiates from (succeedHandshake): only offers we honour
        self.websocket_extensions = (deflate.offers(self.websocket_extensions)
                                     if factory.settings.permessage_deflate else [])
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
        negotiated = self._perMessageCompress
        if negotiated is not None:
            self._perMessageCompress = deflate.Inflate.replacing(negotiated)
            self._deflater = factory.deflaters.get(negotiated.server_max_window_bits,
                                                   not negotiated.server_no_context_takeover)
        if self._denied is not None:
            self.sendClose(self._denied.code, self._denied.reason)
            return
        settings = factory.settings
        # with auth disabled every socket is the same user: no per-user cap
        per_user = settings.max_connections_per_user if settings.enable_auth else 0
        if per_user and factory.hub.user_sockets(self.user_id) >= per_user:
            factory.stats.handshakes_refused["per_user"] += 1
            self.close(CLOSE_POLICY, "too many connections")
            return
        factory.hub.attach(self)
        self._attached = True
        factory.keepalive.add(self)
        factory.stats.open_sockets += 1
        factory.stats.sockets_opened += 1
        self._session = factory.session_for(self)
        if settings.rate_limit:
            self._bucket = TokenBucket(settings.rate_limit, settings.rate_burst, factory.clock.seconds())
        self._schedule_expiry()

    def onPong(self, payload: bytes) -> None:
        self.factory.keepalive.pong(self)

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

    def dataReceived(self, data: bytes) -> None:
        if not self._hanging_up:  # else closed for misbehaviour: nothing it sends matters
            super().dataReceived(data)

    def onFrameBegin(self) -> None:
        """The bounds on a frame, from its header (module docstring)."""
        state = self.state
        if state == STATE_OPEN or (state == _WS.STATE_CLOSING and not self._hanging_up):
            frame = self.current_frame
            opcode = frame.opcode
            refused = False
            # closing: the client's frames are read until its close frame
            # comes, and dropped (onMessage); the rate limit no longer
            # matters, the bounds on a message still do (hung up: the rest
            # of the read is parsed, then nothing more is read)
            if state == STATE_OPEN:
                bucket = self._bucket
                refused = bucket is not None and opcode != 8 and not bucket.take(self.factory.clock.seconds())
                if refused:
                    self._rate_refused(bucket)  # type: ignore[arg-type]
            if opcode > 7:  # close, ping, pong
                if refused and opcode == 9:
                    self._skip_pong = True
            elif opcode:  # a new message
                if self._continuations:
                    self._continuations = 0
                if refused or self._refused:
                    self._refused = refused
                if frame.length > self.factory.settings.max_inbound_frame and not (
                        frame.rsv == 4 and self._perMessageCompress is not None):  # compressed: bounded inflating
                    self._too_big()
            else:  # a continuation
                self._continuation(frame.length, refused)
        super().onFrameBegin()

    def _continuation(self, length: int, refused: bool) -> None:
        if refused:
            self._refused = True
        settings = self.factory.settings
        count = self._continuations = self._continuations + 1
        if count >= settings.max_message_frames:
            self._fail_connection(CLOSE_TOO_BIG, "received WebSocket message exceeds the limit of "
                                                 f"{settings.max_message_frames} frames")
        elif not self._isMessageCompressed and self.message_data_total_length + length > settings.max_inbound_frame:
            self._too_big()

    def _too_big(self) -> None:
        self._fail_connection(CLOSE_TOO_BIG, "received WebSocket message exceeds payload limit of "
                                             f"{self.factory.settings.max_inbound_frame} octets")

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        """Autobahn's own size checks: a frame over its bound on the wire,
        a message inflating past the limit."""
        self._too_big()

    def _rate_refused(self, bucket: TokenBucket) -> None:
        """A frame over the rate: a message gets an error reply, a ping no
        pong; ``rate_abuse_close`` refusals in a row close 1008."""
        self.factory.stats.rate_limited += 1
        if bucket.refused >= self.factory.settings.rate_abuse_close:
            log.info("rate limit abused: closing socket of user {user_id}", user_id=self.user_id)
            self._shut(CLOSE_POLICY, "rate limit exceeded")

    def onPing(self, payload: bytes) -> None:
        if self._skip_pong:
            self._skip_pong = False
            return
        super().onPing(payload)

    def _fail_connection(self, code: int = _WS.CLOSE_STATUS_CODE_GOING_AWAY, reason: str = "going away") -> None:
        """Autobahn fails a connection (1002, 1007, 1009) with a close frame,
        then reads on, waiting for the client's; we hang up instead, so a
        client that breaks the protocol costs nothing more (RFC 6455 7.1.7)."""
        was_open = self.state == STATE_OPEN
        super()._fail_connection(code, reason)
        if was_open and self.state == _WS.STATE_CLOSING:
            self._hang_up()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._session is None or self.state != STATE_OPEN:
            return  # unauthenticated or closing: no frame but the close is sent
        if isBinary:
            self.close(CLOSE_UNSUPPORTED, "binary frames are not supported")
            return
        message: bytes | Refused = payload
        if self._refused:  # a frame of it was over the rate limit
            self._refused = False
            message = REFUSED  # answered in turn, after the replies to the frames before it
        elif self._perMessageCompress is not None and len(payload) > self.factory.settings.max_inbound_frame:
            self._too_big()  # inflated one byte past the limit: no further
            return
        if self._busy is not None:
            if self._inbox is None:
                self._inbox = deque()
            self._inbox.append(message)
            return
        self._dispatch(message)

    def _dispatch(self, payload: bytes | Refused) -> None:
        """Handle ``payload``, then what waits in the inbox, in order, until
        a handler waits: one loop, however many handlers answer at once
        (a Deferred that has already fired included)."""
        while True:
            session = self._session
            if session is None:
                return
            pending = None
            if payload is REFUSED:
                self.send_reply(RATE_LIMITED)
            else:
                try:
                    pending = session.handle(payload)
                except Exception:
                    self._handler_failed(Failure())
            if pending is not None:
                pending.addErrback(self._handler_failed)
                fired: list[object] = []
                pending.addBoth(fired.append)
                if not fired:  # it waits: so do the frames after it
                    self._busy = pending
                    self._read(False)  # what follows waits in the client's TCP buffers, not here
                    pending.addBoth(self._resume)
                    return
            inbox = self._inbox
            if not inbox:
                return
            payload = inbox.popleft()

    def _resume(self, _: object) -> None:
        self._busy = None
        if self._inbox:
            self._dispatch(self._inbox.popleft())
        if self._busy is None:
            self._read(True)

    def _read(self, on: bool) -> None:
        transport: Any = self.transport
        if transport is not None and self.state != _WS.STATE_CLOSED:
            if on:
                transport.resumeProducing()
            else:
                transport.pauseProducing()

    def _handler_failed(self, failure: Failure) -> None:
        # no reply for this frame; the socket stays usable
        self.factory.stats.handler_errors += 1
        log.failure("failed to handle a frame of user {user_id}", failure, user_id=self.user_id)

    def send_reply(self, payload: bytes) -> None:
        """A reply to this socket's frame: framed here (one unmasked text
        frame, as Autobahn would), never compressed (replies are small)."""
        if self.state == STATE_OPEN:
            self.factory.stats.replies_out += 1
            self.sendData(ws_text_frame(payload))

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
