"""One socket's output, bounded: the write side of :class:`ServerProtocol`.

Every byte the server writes to a socket goes through here: pushed events
(:meth:`push`, queued for one write per reactor turn, :mod:`flush`;
compressed or not, :mod:`deflate`), and whatever Autobahn writes through
``sendData``: the handshake answer, replies, pings, pongs and close frames.

Backpressure: the socket is its transport's streaming producer.  Output is
written while the transport holds nothing; once a write leaves bytes
unsent (the kernel's buffer is full) the transport pauses us, and until it
has written them all and resumes us, new frames are *held* here, whole,
in order.  A frame due while more than ``max_send_buffer`` bytes are unsent
(held plus the transport's) closes the socket 1013 ``slow consumer``
instead of being kept.  So one socket holds at most ``max_send_buffer``
plus one frame, whatever the frame (control frames included), and the
other sockets never wait for a slow one.

Because the transport only ever holds the rest of one write, whose frames
are known, a socket closed for misbehaviour can drop its queued output
without cutting a frame: the held frames, and on bare TCP every whole frame
the transport has not begun to send.  The close frame then follows the
rest of the frame on the wire (:meth:`_shed`, :meth:`_shut`).

A compressing socket remembers one thing more: which pushed frame its
client's inflater window ends with (``_window``, the frame's link), so the
next frame of that key can be sent primed with it (:mod:`deflate`).  It is
set as each pushed frame is queued, in the order the frames go out, and any
data frame written otherwise (a reply) resets it; control frames (ping,
pong, close) leave it.  A frame dropped afterwards (1013, a close) leaves
it naming that frame, but nothing but a close frame follows then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from autobahn.websocket.protocol import WebSocketProtocol as _WS
from twisted.internet.tcp import Connection as TCPConnection
from twisted.logger import Logger

from ..core.wire import OutFrame
from .flush import send_direct
from .limits import descriptor_of, frame_rest, keep_unsent, unsent_bytes

if TYPE_CHECKING:
    from ..core.wire import Link
    from .deflate import Deflater
    from .host import SocketHost

log = Logger()

STATE_OPEN = _WS.STATE_OPEN
STATE_CLOSED = _WS.STATE_CLOSED
CLOSE_TRY_AGAIN = 1013
CLOSE_FRAME = 0x88  # the first byte of a server's close frame (FIN, opcode 8)


class Outbound:
    """Mixin for the Autobahn server protocol (which supplies ``state``,
    ``transport``, ``sendMessage``, ``sendCloseFrame``...)."""

    factory: "SocketHost"
    transport: Any
    state: int
    user_id: str
    _deflater: Deflater | None

    _paused = False  # the transport holds unsent output
    _descriptor: Any = None  # the file descriptor buffering our output
    _plain_tcp = False  # the transport is a bare TCP socket (no TLS wrapper)
    _out: list[bytes] | None = None  # frames pushed this reactor turn, not yet written
    _queued = 0  # their bytes
    _room = 0  # bytes the bound allowed when the first of them was queued
    _held: list[bytes] | None = None  # frames waiting for the transport to drain
    _held_bytes = 0
    _tail: Sequence[bytes] | None = None  # the frames of the write the transport still holds part of
    _hanging_up = False  # closed for misbehaviour: input is ignored, output ends with the close frame
    _window: Link | None = None  # compressing: the keyed frame the client's inflater window ends with

    def _watch_output(self) -> None:
        """Become the transport's producer (twisted.web's HTTPChannel
        registered itself before WebSocketResource took the transport
        over; pauses now tell us our client is not reading)."""
        transport = self.transport
        transport.unregisterProducer()  # a no-op when none is registered
        transport.registerProducer(self, True)
        self._plain_tcp = isinstance(transport, TCPConnection)
        descriptor = self._descriptor = descriptor_of(transport)
        bound = self.factory.settings.max_send_buffer
        if descriptor is not None and descriptor.bufferSize > bound:
            descriptor.bufferSize = bound  # under TLS, pause us below the bound

    # IPushProducer: the transport tells us when it holds output and when it has written it all

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._tail = None
        held = self._held
        if held is not None:
            self._held = None
            self._held_bytes = 0
            if self.transport is not None and self.state != STATE_CLOSED:
                self._emit(b"".join(held), held)
        if self._hanging_up and self._held is None:
            self._end_output()

    def stopProducing(self) -> None:
        pass

    def unsent(self) -> int:
        """Bytes written to this socket and not yet taken by the kernel
        (the transport's share estimated at its buffer size when the
        transport's buffer cannot be read)."""
        if self._descriptor is not None:
            return unsent_bytes(self._descriptor) + self._held_bytes
        return (self.factory.transport_buffer if self._paused else 0) + self._held_bytes

    # -- writing ------------------------------------------------------------

    def push(self, frame: OutFrame) -> None:
        """Write a frame built for many sockets: its shared framing (or its
        compressed framing, shared by the sockets of one parameter set),
        queued for one write per reactor turn; held while the client is
        behind."""
        if self.state != STATE_OPEN:
            return
        deflater = self._deflater
        if deflater is None:
            wire = frame.wire
        else:
            wire, self._window = deflater.wire(frame, self._window)
        if self._paused:
            self._hold(wire)
            return
        out = self._out
        if out is None:
            self._out = [wire]
            self._queued = len(wire)
            # what is queued counts against the bound, with what is already unsent
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
        if self.transport is None or self.state == STATE_CLOSED:
            return
        if self._paused:
            for wire in out:
                if self.state != STATE_OPEN:  # closed as a slow consumer meanwhile
                    break
                self._hold(wire)
        else:
            self._emit(out[0] if len(out) == 1 else b"".join(out), out)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Every frame Autobahn writes (the handshake answer, replies, pings,
        pongs, close) goes after the events already queued for this socket,
        and counts against the bound like them.  A data frame (a reply) ends
        the client's inflater window with something no pushed frame refers
        back to; control frames leave it as it is."""
        if self._out is not None:
            self.flush()
        if self._window is not None and data[0] & 0x0F < 8:  # opcode: text, binary, continuation
            self._window = None
        if sync or chopsize:  # Autobahn's trickled writes: never used here
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
        elif self._paused:
            self._hold(data)
        else:
            self._emit(data)

    def _emit(self, data: bytes, frames: Sequence[bytes] | None = None) -> None:
        """Write whole frames (``frames``, joined in ``data``; or one).  On
        bare TCP, to a transport that holds nothing: straight to the
        kernel, and what it does not take to the transport, which is then
        asked to resume us (we pause) once it has written it all.  Under TLS
        the transport pauses us when it holds its buffer size (or
        ``max_send_buffer``, if smaller)."""
        transport = self.transport
        if not self._plain_tcp:  # never straight to the kernel under TLS: it would bypass encryption
            transport.write(data)
            return
        rest = send_direct(transport, data)
        if rest:
            self._tail = (data,) if frames is None else frames
            transport.write(rest)
            if not self._paused:  # as the transport does at its buffer size, but at once
                transport.producerPaused = True
                self._paused = True

    def _hold(self, data: bytes) -> None:
        # every frame counts but the close frame, which ends the output
        if data[0] != CLOSE_FRAME and self.unsent() > self.factory.settings.max_send_buffer:
            self._slow_consumer()
            return
        held = self._held
        if held is None:
            self._held = [data]
        else:
            held.append(data)
        self._held_bytes += len(data)

    # -- closing for misbehaviour ---------------------------------------------

    def _slow_consumer(self) -> None:
        self.factory.stats.slow_consumer_closes += 1
        log.info("slow consumer: closing socket of user {user_id} ({unsent} bytes unsent)",
                 user_id=self.user_id, unsent=self.unsent())
        self._shed()
        self._shut(CLOSE_TRY_AGAIN, "slow consumer")

    def _shed(self) -> None:
        """Drop this socket's queued output: this turn's frames, the held
        ones, and on bare TCP the whole frames the transport has not begun
        to send.  The rest of a frame partly sent stays, or the close frame
        would land inside it."""
        self._out = None
        self._queued = 0
        self._held = None
        self._held_bytes = 0
        descriptor = self._descriptor
        if self._tail is not None and descriptor is not None:
            keep_unsent(descriptor, frame_rest(self._tail, unsent_bytes(descriptor)))

    def _shut(self, code: int, reason: str) -> None:
        """Close for misbehaviour: the close frame goes out after what is
        already queued, the client's input is ignored from now on, and the
        connection ends once the close frame is written (or is aborted if
        the client has not read it after the closing handshake timeout)."""
        if self.state == _WS.STATE_CONNECTING:
            self.transport.abortConnection()
        if self.state != STATE_OPEN:
            return
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"))  # type: ignore[attr-defined]
        self._hang_up()

    def _hang_up(self) -> None:
        self._hanging_up = True
        if self._held is None:
            self._end_output()
        # else resumeProducing writes the held frames, then ends

    def _end_output(self) -> None:
        """Nothing more will be written: half-close once the transport has
        written what it holds (the peer sees the close frame, then EOF)."""
        transport = self.transport
        if transport is None or self.state == STATE_CLOSED:
            return
        transport.unregisterProducer()  # a paused producer would hold the close back
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        else:  # TLS
            transport.loseConnection()
