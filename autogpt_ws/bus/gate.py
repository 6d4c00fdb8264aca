"""The sharded bus's side of a subscribe: the session's SubscriptionGate.

Before a subscribe to an execution is answered, the execution is looked up
(its graph names its channel; an unknown, deleted or other user's run is
refused, as the AutoGPT server does).  Then :meth:`ClusterGate.settle`
holds the key's shard channel wanted, waits until its shard has confirmed
the ``SSUBSCRIBE`` (at most the connect timeout), and asks catch-up for the
frames to replay; the session then joins the hub, replies and pushes them
in one call, and :meth:`release` lets the hold go.  So a client that has
its reply misses nothing published after it, and what it is replayed is
never older than what it gets live next.

On a graceful stop, :meth:`hand_over` keeps the channels this server was
recording until another server has subscribed each of them (a rolling
restart: the browsers come back to the new one about a second later), so
what is published in between is still written to the store for them;
bounded by ``catchup_handover``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Protocol

from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..core import wire
from ..core.channels import Layout
from .executions import ExecutionResolver
from .replay import ClusterCatchup
from .slots import Address, format_address

log = Logger()

HANDOVER_POLL = 0.1  # seconds between two looks at who else holds our channels


class Channels(Protocol):
    """The cluster bus, as the gate sees it."""

    layout: Layout
    reactor: Any

    def channel_for_key(self, key: str) -> str | None: ...

    def want(self, channel: str) -> None: ...

    def unwant(self, channel: str) -> None: ...

    def confirmed(self, channel: str) -> bool: ...

    def placed(self, channel: str) -> Address | None: ...

    def recording(self) -> list[str]: ...


class ClusterGate:
    def __init__(self, bus: Channels, resolver: ExecutionResolver, catchup: ClusterCatchup | None,
                 timeout: float) -> None:
        self.bus = bus
        self.resolver = resolver
        self.catchup = catchup
        self.timeout = timeout
        self._holds: dict[str, list[str]] = {}  # key -> channels held for subscribes being answered
        self._waiters: dict[str, list[Deferred[None]]] = {}  # channel -> subscribes waiting for its confirmation

    # -- SubscriptionGate -------------------------------------------------------------

    def execution(self, user_id: str, graph_exec_id: str) -> Deferred[bool]:
        return self.resolver.resolve(user_id, graph_exec_id)

    def graph_refusal(self, user_id: str, graph_id: str) -> str | None:
        channel = self.bus.layout.sharded_all(user_id, graph_id)
        return wire.err_wildcard(channel) if "*" in channel else None

    def settle(self, key: str) -> Deferred[list[wire.OutFrame]]:
        """Hold ``key``'s channel, wait for its confirmation, then give the
        frames to replay.  Call :meth:`release` once the socket holds the
        key (or gave up)."""
        channel = self.bus.channel_for_key(key)
        if channel is None:  # not resolved: nothing to hold or replay
            return succeed([])
        self._holds.setdefault(key, []).append(channel)
        self.bus.want(channel)
        d = self._confirmed(channel)
        if self.catchup is None:
            return d.addCallback(lambda _: [])
        return d.addCallback(lambda _: self.catchup.replay(channel, key))  # type: ignore[union-attr]

    def release(self, key: str) -> None:
        held = self._holds.get(key)
        if not held:
            return
        channel = held.pop()
        if not held:
            del self._holds[key]
        self.bus.unwant(channel)

    def _confirmed(self, channel: str) -> Deferred[None]:
        if self.bus.confirmed(channel):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.setdefault(channel, []).append(waiter)
        waiter.addTimeout(self.timeout, self.bus.reactor)
        return waiter.addErrback(self._late, channel, waiter)

    def _late(self, failure: Failure, channel: str, waiter: Deferred[None]) -> None:
        failure.trap(TimeoutError)
        pending = self._waiters.get(channel, [])
        if waiter in pending:  # not kept while its shard stays away
            pending.remove(waiter)
            if not pending:
                del self._waiters[channel]
        log.warn("{channel} not confirmed by its shard within {timeout}s; answering the subscribe anyway "
                 "(delivery starts once it is)", channel=channel, timeout=self.timeout)

    # -- what the bus says -----------------------------------------------------------

    def channel_confirmed(self, channel: str) -> None:
        if self.catchup is not None:
            self.catchup.live(channel, self.bus.reactor.seconds())
        for waiter in self._waiters.pop(channel, ()):
            if not waiter.called:
                waiter.callback(None)

    def channel_gone(self, channel: str) -> None:
        if self.catchup is not None:
            self.catchup.gone(channel)

    def stop(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for pending in waiters.values():
            for waiter in pending:
                if not waiter.called:
                    waiter.callback(None)

    # -- a graceful stop ---------------------------------------------------------------

    @inlineCallbacks
    def hand_over(self, timeout: float) -> Any:
        """Keep recording until another server holds each channel we were
        recording for catch-up, or ``timeout`` passes."""
        bus = self.bus
        store = self.catchup.store if self.catchup is not None else None
        channels = bus.recording()
        if store is None or not channels or timeout <= 0:
            return
        reactor = bus.reactor
        started = reactor.seconds()
        deadline = started + timeout
        left = set(channels)
        while left and reactor.seconds() < deadline:
            by_node: dict[Any, list[str]] = defaultdict(list)
            for channel in left:
                address = bus.placed(channel)
                if address is not None:
                    by_node[address].append(channel)
            for address, some in by_node.items():
                remaining = deadline - reactor.seconds()
                if remaining <= 0:
                    break
                # bounded: a master that accepts and never answers must not hold the stop
                asked = store.node(address).command("PUBSUB", "SHARDNUMSUB", *some)
                asked.addTimeout(remaining, reactor)
                try:
                    counts = yield asked
                except TimeoutError:
                    log.warn("catch-up hand-over: {address} did not answer PUBSUB SHARDNUMSUB within {remaining:.2f}s; "
                             "giving up on {count} channels there", address=format_address(address),
                             remaining=remaining, count=len(some))
                    continue
                except Exception:
                    continue
                for i in range(0, len(counts), 2):
                    if int(counts[i + 1]) >= 2:  # ours and another server's
                        left.discard(counts[i].decode("utf-8", "replace"))
            remaining = deadline - reactor.seconds()
            if left and remaining > 0:
                yield deferLater(reactor, min(HANDOVER_POLL, remaining), lambda: None)
        log.info("catch-up hand-over: {taken} of {count} channels taken over by another server in {elapsed:.2f}s",
                 taken=len(channels) - len(left), count=len(channels), elapsed=reactor.seconds() - started)
