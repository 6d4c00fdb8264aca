"""permessage-deflate (RFC 7692) with no compression state per socket.

Negotiation: a client's offer is answered ``permessage-deflate;
client_no_context_takeover`` (plus ``server_max_window_bits=N`` when the
client asked for N): what a client sends is compressed message by message,
so nothing is kept between its messages; and the client keeps its
inflater's window across the server's messages, so a pushed frame may refer
back to the one before it (keyed history, below).  A client that asks
``server_no_context_takeover``, or every client when ``deflate_history`` is
0, is answered with it too and gets frames compressed on their own only.
An offer the server cannot honour (a parameter not in RFC 7692, a repeated
or bad value, or ``server_max_window_bits=8``, which neither zlib nor ISA-L
make) is declined, and the socket runs uncompressed, instead of failing the
handshake as Autobahn would.

Outbound: the sockets that negotiated the same server window share a
:class:`Deflater` (a parameter set).  A pushed frame is compressed at most
once per window size and form, cached on its :class:`~wire.OutFrame`, and
every socket of that set that needs that form writes the same bytes.  Two
forms: on its own, and *primed*: compressed with the end of the previous
frame of its subscription key (``deflate_history`` bytes, within the
window) as preset dictionary, for a socket whose inflater window ends with
that frame.  The server keeps no zlib object per socket, only which frame
its client's window ends with (:meth:`Deflater.wire`): the link of the last
frame it was sent compressed, if that frame belongs to a key's stream and
nothing was sent after it (anything else resets it: :mod:`outbound`).
The previous frame of each key is the hub's to remember (:mod:`hub`).
Frames under ``threshold`` bytes go uncompressed (RSV1 clear), as does a
frame compressing made no smaller.  The compressor is ISA-L's (``isal``),
two to three times faster than zlib's level 1 for slightly smaller output;
its output is plain deflate.

Inbound: :class:`Inflate` is Autobahn's inflater, made afresh for each
compressed message and dropped at its end; the size bound on inflating
(``max_message_size``) is Autobahn's.  A client that keeps its compression
context anyway sends a second message that refers back to the first: it
does not inflate, and the socket is closed 1007.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from autobahn.websocket.compress import PerMessageDeflate, PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from isal import isal_zlib

from ..core.wire import NO_STREAM, Link, OutFrame, ws_text_frame
from ..stats import Stats

EXTENSION = "permessage-deflate"
MEM_LEVEL = 8  # ISA-L's state for one frame (~370 KiB, freed at once); 1 to 9 change little here

Extension = tuple[str, dict[str, list[Any]]]  # Autobahn's parsed Sec-WebSocket-Extensions entry


def offers(extensions: Sequence[Extension]) -> list[Extension]:
    """The client's permessage-deflate offers the server can take up, in
    the client's order (RFC 7692 section 5: the others are declined)."""
    usable = []
    for name, params in extensions:
        if name != EXTENSION:
            continue
        try:
            PerMessageDeflateOffer.parse(params)  # parameters of RFC 7692, once each, values in range
        except Exception:
            continue
        usable.append((name, params))
    return usable


class Accept(PerMessageDeflateOfferAccept):
    """The answer to an offer: no context takeover from the client; from
    the server too when ``keyed`` is false or the client asked for it."""

    def __init__(self, offer: PerMessageDeflateOffer, max_message_size: int, keyed: bool) -> None:
        super().__init__(offer, request_no_context_takeover=True,
                         no_context_takeover=offer.request_no_context_takeover or not keyed,
                         max_message_size=max_message_size)

    def get_extension_string(self) -> str:
        answer = EXTENSION
        if self.no_context_takeover:
            answer += "; server_no_context_takeover"
        answer += "; client_no_context_takeover"
        bits = self.offer.request_max_window_bits
        return f"{answer}; server_max_window_bits={bits}" if bits else answer


def acceptor(max_message: int, keyed: bool) -> Callable[[Sequence[Any]], Accept | None]:
    """Autobahn's ``perMessageCompressionAccept``: the first offer (all
    usable, :func:`offers`).  A message inflates to at most one byte past
    ``max_message`` (zlib's max_length), so a compression bomb is cut
    there and the protocol refuses that one byte exactly.  ``keyed``: the
    server's frames may refer back to earlier ones (``deflate_history``)."""

    def accept(offered: Sequence[Any]) -> Accept | None:
        for offer in offered:
            if isinstance(offer, PerMessageDeflateOffer):
                return Accept(offer, max_message + 1, keyed)
        return None

    return accept


class Inflate(PerMessageDeflate):
    """A socket's permessage-deflate object once it is open: inflates each
    message with a fresh zlib object, dropped at the end of the message.
    It never compresses (pushed frames come from a :class:`Deflater`,
    replies are sent plain)."""

    @classmethod
    def replacing(cls, negotiated: PerMessageDeflate) -> "Inflate":
        return cls(True, True, True, negotiated.server_max_window_bits, negotiated.client_max_window_bits,
                   negotiated.mem_level, negotiated.max_message_size)

    def end_decompress_message(self) -> None:
        try:
            super().end_decompress_message()
        finally:
            self._decompressor = None


class Deflater:
    """One parameter set: compresses a frame for every socket that
    negotiated ``window_bits`` (the key of :meth:`OutFrame.deflated`), and,
    when ``history`` (bytes, 0: never), primes it with the previous frame
    of its key for the sockets whose window ends with that frame."""

    __slots__ = ("window_bits", "level", "threshold", "history", "stats")

    def __init__(self, window_bits: int, level: int, threshold: int, stats: Stats, history: int = 0) -> None:
        self.window_bits = window_bits
        self.level = level
        self.threshold = threshold
        self.history = history
        self.stats = stats

    def wire(self, frame: OutFrame, window: Link | None = None) -> tuple[bytes, Link | None]:
        """What a socket of this set writes for ``frame`` when its client's
        inflater window ends with the frame linked by ``window`` (None: no
        frame known), and what that window ends with afterwards: the
        frame's link when it went compressed (None for a frame outside a
        key's stream, or for a set that never primes), else None."""
        if len(frame.payload) < self.threshold:
            return frame.wire, None
        prior = frame.prior
        wire = frame.deflated(self, prior is window and window is not None and window.history is not None)
        if not self.history or prior is NO_STREAM or frame.is_plain(wire):
            return wire, None
        link = frame.link
        if link is None:  # the first socket to take the frame compressed: keep its end for the next one
            payload = frame.payload
            link = frame.link = Link(payload if len(payload) <= self.history else payload[-self.history:])
        return wire, link

    def frame(self, payload: bytes, history: bytes | None = None) -> bytes | None:
        """``payload`` as one compressed text frame (RFC 7692 7.2.1: raw
        deflate, flushed, without the final ``00 00 ff ff``), with
        ``history`` as preset dictionary (its last window's worth: what the
        client's inflater window ends with); None when that is no smaller."""
        stats = self.stats
        if history is None:
            compressor = isal_zlib.compressobj(self.level, isal_zlib.DEFLATED, -self.window_bits, MEM_LEVEL)
        else:
            window = 1 << self.window_bits
            compressor = isal_zlib.compressobj(self.level, isal_zlib.DEFLATED, -self.window_bits, MEM_LEVEL,
                                               zdict=history if len(history) <= window else history[-window:])
            stats.deflate_primed += 1
        body = compressor.compress(payload) + compressor.flush(isal_zlib.Z_SYNC_FLUSH)
        size = len(body) - 4
        stats.deflate_frames += 1
        stats.deflate_bytes_in += len(payload)
        if size >= len(payload):
            stats.deflate_bytes_out += len(payload)
            return None
        stats.deflate_bytes_out += size
        return ws_text_frame(body[:size], compressed=True)


class Deflaters:
    """A server's parameter sets, one per server window size in use and
    per context takeover (a socket that asked ``server_no_context_takeover``
    is never primed); they share the frames' compressed forms."""

    def __init__(self, level: int, threshold: int, history: int, stats: Stats) -> None:
        self._level = level
        self._threshold = threshold
        self._history = history
        self._stats = stats
        self._sets: dict[tuple[int, bool], Deflater] = {}

    def get(self, window_bits: int, takeover: bool) -> Deflater:
        deflater = self._sets.get((window_bits, takeover))
        if deflater is None:
            history = self._history if takeover else 0
            deflater = self._sets[window_bits, takeover] = Deflater(window_bits, self._level, self._threshold,
                                                                     self._stats, history)
        return deflater
