"""Per-socket limits that need a little state: the inbound frame rate
(a token bucket) and a socket's unsent output (its size, and dropping all
of it but the frame being sent)."""

from __future__ import annotations

from typing import Any, Sequence


class TokenBucket:
    """``rate`` frames per second sustained, ``burst`` at once.

    ``take(now)`` spends one token when there is one.  ``refused`` counts
    the frames refused since the last one admitted, so a caller can tell a
    burst from sustained abuse.  Times are seconds from the caller's clock.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "refused")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now
        self.refused = 0

    def take(self, now: float) -> bool:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.refused = 0
            return True
        self.refused += 1
        return False


def descriptor_of(transport: Any) -> Any:
    """The Twisted file descriptor (TCP or UNIX socket) that buffers what is
    written to ``transport``: the transport itself, or the one under a
    wrapping protocol such as TLS.  None when there is none (in-memory
    transports)."""
    seen = 0
    while transport is not None and seen < 4:
        if hasattr(transport, "dataBuffer") and hasattr(transport, "_tempDataLen"):
            return transport
        transport = getattr(transport, "transport", None)
        seen += 1
    return None


def unsent_bytes(descriptor: Any) -> int:
    """Bytes written to a file descriptor and not yet handed to the kernel
    (``twisted.internet.abstract.FileDescriptor``'s two buffers)."""
    return len(descriptor.dataBuffer) - descriptor.offset + descriptor._tempDataLen


def frame_rest(frames: Sequence[bytes], unsent: int) -> int:
    """How many of the last ``unsent`` bytes of ``b"".join(frames)`` (whole
    frames) belong to the frame partly sent: the bytes to keep so that
    dropping the rest never cuts a frame."""
    whole = 0
    for frame in reversed(frames):
        if whole + len(frame) > unsent:
            break
        whole += len(frame)
    return unsent - whole


def keep_unsent(descriptor: Any, keep: int) -> None:
    """Drop all but the first ``keep`` bytes a file descriptor has not
    sent yet (its buffers, as :func:`unsent_bytes` reads them)."""
    if keep >= unsent_bytes(descriptor):
        return
    pending = descriptor.dataBuffer[descriptor.offset:] + b"".join(descriptor._tempDataBuffer)
    descriptor.dataBuffer = pending[:keep]
    descriptor.offset = 0
    descriptor._tempDataBuffer = []
    descriptor._tempDataLen = 0
