"""One write per socket per reactor turn.

A burst of events read from the bus in one chunk would otherwise cost each
socket one ``transport.write`` per event: a buffer append, a ``startWriting``
(an epoll change), a writable event and a ``send`` later, and another epoll
change to stop writing.  Instead a socket queues the shared frames it is
pushed during the turn and :class:`Flusher` asks every such socket to flush
once, at the next turn (``callLater(0)``): one ``send`` of everything,
straight on the socket when nothing is waiting in its transport.
"""

from __future__ import annotations

from typing import Any, Protocol

from .limits import unsent_bytes


class Flushable(Protocol):
    def flush(self) -> None: ...


class Flusher:
    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._dirty: list[Flushable] = []
        self._call: Any = None

    def mark(self, socket: Flushable) -> None:
        """``socket`` has queued output: flush it at the next turn."""
        self._dirty.append(socket)
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush_all)

    def flush_all(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        dirty, self._dirty = self._dirty, []
        for socket in dirty:
            socket.flush()


def send_direct(descriptor: Any, data: bytes) -> bytes:
    """Hand ``data`` to the kernel now when the Twisted file descriptor has
    nothing buffered (so order is kept); return what it did not take, for
    ``transport.write``."""
    if unsent_bytes(descriptor) or not descriptor.connected or descriptor.disconnecting:
        return data
    try:
        sent = descriptor.socket.send(data)
    except BlockingIOError:
        return data
    except OSError:
        return data  # the transport will meet the error and close
    return data[sent:]
