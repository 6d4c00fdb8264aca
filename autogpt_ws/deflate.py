"""permessage-deflate (RFC 7692) with no compression state per socket.

Negotiation: a client's offer is answered ``permessage-deflate;
server_no_context_takeover; client_no_context_takeover`` (plus
``server_max_window_bits=N`` when the client asked for N), which every
browser accepts: each message, in either direction, is compressed on its
own, so nothing is kept between messages.  An offer the server cannot
honour (a parameter not in RFC 7692, a repeated or bad value, or
``server_max_window_bits=8``, which neither zlib nor ISA-L make) is
declined, and the socket runs uncompressed, instead of failing the
handshake as Autobahn would.

Outbound: the sockets that negotiated the same server window share a
:class:`Deflater` (a parameter set).  A pushed frame is compressed at most
once per parameter set, cached on its :class:`~wire.OutFrame`, and every
socket of that set writes the same bytes.  Frames under ``threshold`` bytes
go uncompressed (RSV1 clear), as does a frame compressing made no smaller.
The compressor is ISA-L's (``isal``), two to three times faster than
zlib's level 1 for slightly smaller output; its output is plain deflate.

Inbound: :class:`Inflate` is Autobahn's inflater, made afresh for each
compressed message and dropped at its end; the size bound on inflating
(``max_message_size``) is Autobahn's.  A client that keeps its compression
context anyway sends a second message that refers back to the first: it
does not inflate, and the socket is closed 1007.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from autobahn.websocket.compress import (
    PerMessageDeflate,
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from isal import isal_zlib

from .metrics import Stats
from .wire import OutFrame, ws_text_frame

EXTENSION = "permessage-deflate"
ANSWER = f"{EXTENSION}; server_no_context_takeover; client_no_context_takeover"
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
    """The answer to an offer: no context takeover either way."""

    def __init__(self, offer: PerMessageDeflateOffer, max_message_size: int) -> None:
        super().__init__(offer, request_no_context_takeover=True, no_context_takeover=True,
                         max_message_size=max_message_size)

    def get_extension_string(self) -> str:
        bits = self.offer.request_max_window_bits
        return f"{ANSWER}; server_max_window_bits={bits}" if bits else ANSWER


def acceptor(max_message: int) -> Callable[[Sequence[Any]], Accept | None]:
    """Autobahn's ``perMessageCompressionAccept``: the first offer (all
    usable, :func:`offers`).  A message inflates to at most one byte past
    ``max_message`` (zlib's max_length), so a compression bomb is cut
    there and the protocol refuses that one byte exactly."""

    def accept(offered: Sequence[Any]) -> Accept | None:
        for offer in offered:
            if isinstance(offer, PerMessageDeflateOffer):
                return Accept(offer, max_message + 1)
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
    negotiated ``window_bits`` (the key of :meth:`OutFrame.deflated`)."""

    __slots__ = ("window_bits", "level", "threshold", "stats")

    def __init__(self, window_bits: int, level: int, threshold: int, stats: Stats) -> None:
        self.window_bits = window_bits
        self.level = level
        self.threshold = threshold
        self.stats = stats

    def wire(self, frame: OutFrame) -> bytes:
        """What a socket of this set writes for ``frame``."""
        if len(frame.payload) < self.threshold:
            return frame.wire
        return frame.deflated(self)

    def frame(self, payload: bytes) -> bytes | None:
        """``payload`` as one compressed text frame (RFC 7692 7.2.1: raw
        deflate, flushed, without the final ``00 00 ff ff``); None when that
        is no smaller."""
        compressor = isal_zlib.compressobj(self.level, isal_zlib.DEFLATED, -self.window_bits, MEM_LEVEL)
        body = compressor.compress(payload) + compressor.flush(isal_zlib.Z_SYNC_FLUSH)
        size = len(body) - 4
        stats = self.stats
        stats.deflate_frames += 1
        stats.deflate_bytes_in += len(payload)
        if size >= len(payload):
            stats.deflate_bytes_out += len(payload)
            return None
        stats.deflate_bytes_out += size
        return ws_text_frame(body[:size], compressed=True)


class Deflaters:
    """A server's parameter sets, one per server window size in use."""

    def __init__(self, level: int, threshold: int, stats: Stats) -> None:
        self._level = level
        self._threshold = threshold
        self._stats = stats
        self._sets: dict[int, Deflater] = {}

    def get(self, window_bits: int) -> Deflater:
        deflater = self._sets.get(window_bits)
        if deflater is None:
            deflater = self._sets[window_bits] = Deflater(window_bits, self._level, self._threshold, self._stats)
        return deflater
