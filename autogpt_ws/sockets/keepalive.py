"""Protocol pings for every socket, on one timer.

Autobahn's own auto-ping gives each socket two timers per ping (the next
ping, then the pong's deadline): new objects every ``ping_interval`` that
live for seconds, so the garbage collector's oldest generation keeps
growing by a few objects per socket and runs a full collection about every
interval, whose pause grows with the number of sockets (measured: 75 ms at
5,000 sockets, 270-550 ms at 19,500; benchmarks/curve.py).  Here one
:class:`~twisted.internet.task.LoopingCall` every ``tick`` seconds walks a
wheel of slots: a socket sits in the slot of its next due time, which is
its next ping, or, once pinged, its pong's deadline.  Per socket: a slot
number and a flag; per ping: one shared two-byte frame.  A pong moves the
socket to the slot of its next ping (``ping_interval`` after the pong, as
Autobahn does); a socket still waiting at its deadline is dropped (the
client sees 1006, as before).

A turn's work is a ping per socket due, then, a moment later, their
pongs: some tens of microseconds per socket in all.  Two things keep it
from holding deliveries up: a turn pings at most ``SLICE`` sockets, then
yields to the reactor (``callLater(0)``) and goes on where it stopped, so
events and pongs that arrived meanwhile are served between slices; and a
socket's first ping falls at a random point between half an interval and
one and a half intervals after it opens, so sockets that opened together
(every browser reconnecting after a restart) do not ping together for
ever after: their pings spread evenly over the interval.  Measured with
benchmarks/curve.py at 19,500 sockets and 20,000 deliveries/s, three runs
each, alternating: the longest reactor stall of a 10 s spell was 35-54 ms
when a turn pinged every socket due at once, with no spread, and 15-25 ms
with both (what is left is fan-out work: about 2.5 ms per event there).
A shorter tick would bound a turn too, but every wake-up of an idle
server costs (a 1/32 s tick took 0.65% of a core with no socket open,
against 0.05% with pings off).  Times are rounded up to the tick.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Protocol

from twisted.internet.task import LoopingCall

PING = b"\x89\x00"  # an unmasked ping frame with no payload (RFC 6455 5.5.2)
MAX_TICK = 0.25
SLICE = 64  # sockets pinged (or dropped) before the wheel yields to the reactor


class Pinged(Protocol):
    """A socket, as the keepalive sees it."""

    _ka_slot: int
    _ka_waiting: bool

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None: ...

    def abort(self) -> None: ...


class Keepalive:
    def __init__(self, clock: Any, interval: float, timeout: float,
                 spread: Callable[[], float] = random.random) -> None:
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.spread = spread  # uniform in [0, 1): where in its first interval a socket's first ping falls
        self.tick = max(0.01, min(MAX_TICK, interval / 4, timeout / 4 if timeout > 0 else MAX_TICK))
        self._slots: dict[int, set[Pinged]] = {}
        self._done = self._slot(clock.seconds()) - 1  # the last slot walked
        self._loop: LoopingCall | None = None
        self._due = self._done  # the last slot to walk in this turn
        self._resume: Any = None  # the DelayedCall that goes on with a turn cut short
        self.pings = 0  # sent
        self.dropped = 0  # sockets that did not answer in time

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def _slot(self, at: float) -> int:
        return math.ceil(at / self.tick)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self._loop is None:
            self._done = self._due = self._slot(self.clock.seconds()) - 1
            self._loop = LoopingCall(self._turn)
            self._loop.clock = self.clock
            self._loop.start(self.tick, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None

    # -- sockets --------------------------------------------------------------------

    def add(self, proto: Pinged) -> None:
        """An open socket: its first ping is due between half an interval and
        one and a half intervals from now, at random (an interval on average)."""
        if self.enabled:
            proto._ka_waiting = False
            self._put(proto, self.clock.seconds() + self.interval * (0.5 + self.spread()))

    def remove(self, proto: Pinged) -> None:
        slot = getattr(proto, "_ka_slot", None)
        if slot is not None:
            members = self._slots.get(slot)
            if members is not None:
                members.discard(proto)
                if not members:
                    del self._slots[slot]
            del proto._ka_slot

    def pong(self, proto: Pinged) -> None:
        """Any pong is an answer; the next ping is due ``interval`` later."""
        if getattr(proto, "_ka_waiting", False):
            proto._ka_waiting = False
            self.remove(proto)
            self._put(proto, self.clock.seconds() + self.interval)

    def _put(self, proto: Pinged, due: float, after: int = -1) -> None:
        slot = max(self._slot(due), self._done + 1, after + 1)
        proto._ka_slot = slot
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = set()
        members.add(proto)

    # -- the wheel ------------------------------------------------------------------

    def _turn(self) -> None:
        self._due = self._slot(self.clock.seconds())
        if self._resume is None:  # else the turn cut short goes on, now up to here
            self._walk()

    def _walk(self) -> None:
        """Walk the slots up to ``_due``, ``SLICE`` sockets at a time.  A
        socket stays in its slot's set until its turn comes, so one closed
        meanwhile (``remove``) is never touched."""
        self._resume = None
        budget = SLICE
        slots = self._slots
        while self._done < self._due:
            slot = self._done + 1
            members = slots.get(slot)
            if members:
                now = self.clock.seconds()
                while members and budget:
                    proto = members.pop()
                    budget -= 1
                    del proto._ka_slot
                    if proto._ka_waiting:
                        self.dropped += 1
                        proto.abort()  # no pong in time: dropped, as a dead connection
                    else:
                        if self.timeout > 0:  # else no deadline: pinged again after the interval
                            proto._ka_waiting = True
                        self._put(proto, now + (self.timeout if self.timeout > 0 else self.interval), after=slot)
                        self.pings += 1
                        proto.sendData(PING)
                if members:  # the budget is spent: the rest after the reactor's other work
                    self._resume = self.clock.callLater(0, self._walk)
                    return
            slots.pop(slot, None)
            self._done = slot
