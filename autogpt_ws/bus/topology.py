"""The cluster's slot map, kept fresh: which master owns which hash slot.

:class:`SlotMapFeed` fetches ``CLUSTER SLOTS`` on a short-lived control
connection and hands each map to the bus.  It asks, in order: the nodes it
was hinted at (the sender of a ``MOVED`` or of a server-side
``sunsubscribe`` knows the new owner), the masters whose links are up, the
seed nodes, then the masters whose links are down; the first node that
answers with a map serving slots wins.

A burst of requests costs one fetch per :data:`MIN_REFRESH_INTERVAL`; a
request during a fetch runs one more fetch after it; a map is fetched every
``refresh_interval`` anyway; failures retry with jittered backoff and are
kept as the reason ``/ready`` gives while there is no map.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from .resp import RedisProtocol, connect, handshake
from .shard import ConnectOptions, backoff, closed, hang_up
from .slots import Address, SlotMap, format_address

log = Logger()

MIN_REFRESH_INTERVAL = 0.5  # a burst of MOVED/sunsubscribe costs one refresh per this

#: the nodes to ask besides the hints: (masters whose links are up, masters whose links are down)
Known = Callable[[], tuple[list[Address], list[Address]]]


class SlotMapFeed:
    def __init__(self, seeds: list[Address], remap: Callable[[Address], Address], options: ConnectOptions,
                 reactor: Any, known: Known, apply: Callable[[SlotMap], None], *,
                 refresh_interval: float = 30.0, rng: Callable[[], float]) -> None:
        self.seeds = seeds
        self.remap = remap
        self.options = options
        self.reactor = reactor
        self.known = known
        self.apply = apply
        self.refresh_interval = refresh_interval
        self.rng = rng
        self.running = False
        self.refreshes = 0  # slot maps fetched
        self.failures = 0  # fetches failed in a row
        self.last_error = "discovering the cluster"
        self._fetching: Deferred[Any] | None = None
        self._call: Any = None
        self._again = False
        self._last = float("-inf")
        self._hints: list[Address] = []
        self._control: RedisProtocol | None = None
        self._attempt: Deferred[RedisProtocol] | None = None
        self._announce = True  # log the next map (the first since start, or after failures)

    def start(self) -> None:
        self.running = True
        self._announce = True
        self.last_error = "discovering the cluster"
        self._fetch()

    def stop(self) -> list[Deferred[Any]]:
        """Stop fetching; what to wait for before the bus is stopped."""
        self.running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self._attempt is not None:
            self._attempt.cancel()
        waits = []
        control = self._control
        if control is not None and control.connected and control.transport is not None:
            waits.append(closed(control))
            control.transport.abortConnection()
        if self._fetching is not None:
            waits.append(self._fetching)
        return waits

    def request(self, hint: Address | None = None) -> None:
        """Fetch the map soon (at most once per MIN_REFRESH_INTERVAL), asking
        ``hint`` first."""
        if not self.running:
            return
        if hint is not None and hint not in self._hints:
            self._hints.append(hint)
        if self._fetching is not None:
            self._again = True
            return
        self._schedule(max(0.0, self._last + MIN_REFRESH_INTERVAL - self.reactor.seconds()))

    def _schedule(self, delay: float) -> None:
        call = self._call
        if call is not None and call.active():
            if call.getTime() <= self.reactor.seconds() + delay:
                return
            call.cancel()
        self._call = self.reactor.callLater(delay, self._fetch)

    def _fetch(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._fetching is not None or not self.running:
            return
        self._last = self.reactor.seconds()
        up, down = self.known()
        candidates = list(dict.fromkeys([*self._hints, *sorted(up), *self.seeds, *sorted(down)]))
        self._hints = []
        self._fetching = d = self._ask(candidates)
        d.addCallbacks(self._fetched, self._failed)

    @inlineCallbacks
    def _ask(self, candidates: list[Address]) -> Any:
        errors = []
        for address in candidates:
            if not self.running:
                break
            self._attempt = attempt = self._open(address)
            try:
                conn = yield attempt
            except Exception as exc:
                errors.append(f"{format_address(address)}: {exc}")
                continue
            finally:
                self._attempt = None
            self._control = conn
            deadline = self.reactor.callLater(self.options.timeout, conn.transport.abortConnection)
            try:
                yield handshake(conn, self.options.username, self.options.password, 0, self.options.name + "-control")
                reply = yield conn.command("CLUSTER", "SLOTS")
                slots = SlotMap.from_cluster_slots(reply, address).remapped(self.remap)
                if slots.masters():
                    return slots
                errors.append(f"{format_address(address)}: serves no slots")  # reset or not yet joined
            except Exception as exc:
                errors.append(f"{format_address(address)}: {exc}")
            finally:
                self._control = None
                yield hang_up(conn, deadline)
        raise ConnectionError("; ".join(errors) or "no seed node configured")

    def _open(self, address: Address) -> Deferred[RedisProtocol]:
        o = self.options
        return connect(self.reactor, address[0], address[1], timeout=o.timeout, tls=o.tls, ca_file=o.ca_file)

    def _fetched(self, slots: SlotMap) -> None:
        self._fetching = None
        if not self.running:
            return
        self.refreshes += 1
        if self.failures or self._announce:
            self._announce = False
            log.info("cluster slot map: {count} masters {masters}", count=len(slots.masters()),
                     masters=", ".join(format_address(a) for a in sorted(slots.masters())))
        self.failures = 0
        self.apply(slots)
        if self._again:
            self._again = False
            self.request()
        else:
            self._schedule(self.refresh_interval)

    def _failed(self, failure: Failure) -> None:
        self._fetching = None
        if not self.running:
            return
        self.failures += 1
        self.last_error = failure.getErrorMessage()
        delay = backoff(self.failures, self.rng)
        log.warn("cannot read the cluster slot map ({error}); retry {attempt} in {delay:.1f}s",
                 error=self.last_error, attempt=self.failures, delay=delay)
        self._again = False
        self._schedule(delay)
