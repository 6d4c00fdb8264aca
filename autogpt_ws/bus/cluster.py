"""The sharded Redis Cluster bus: what AutoGPT's SPUBLISH executors need.

Redis Cluster has no wildcard for shard channels, so the bus subscribes to
exactly the channels this server's sockets need, driven by the hub
(:class:`~autogpt_ws.core.hub.HubWatcher`)::

    graph key  <u>|graph#<g>|executions -> <exec_bus>/{<u>/<g>}/all
    exec key   <u>|graph_exec#<e>       -> <exec_bus>/{<u>/<g>}/exec/<e>   (g from the resolver)
    a user's first socket               -> <notif_bus>/<u>

The hub's key lifetime is the reference count of a key; channels are
counted again here (a channel is wanted while any key or user maps to it),
so one ``SSUBSCRIBE`` per channel is sent when it becomes wanted and one
``SUNSUBSCRIBE`` when it stops being wanted.

Placement: the slot map (``CLUSTER SLOTS``, kept fresh by
:class:`~autogpt_ws.bus.topology.SlotMapFeed`) names each slot's master; a channel goes on the
:class:`~autogpt_ws.bus.shard.ShardLink` of its slot's master: one
subscriber connection per master, whatever the number of sockets and
channels.  Faults end in a refresh of the map and a re-placement:

- ``MOVED`` to a ``SSUBSCRIBE``: the slot's new owner is taken from the
  error at once, and the map is refreshed from that node;
- a server-sent ``sunsubscribe`` (the slot migrated): refreshed from the
  node that sent it (it knows the new owner);
- a shard node lost (restart, failover): its link reconnects with backoff
  and resubscribes; meanwhile the map is refreshed, and if another node now
  owns its slots (a replica was promoted) the channels move there and the
  old link is closed;
- a refresh every ``refresh_interval`` seconds catches anything else.

A channel is removed from its old link before it is added to the new one,
and a link delivers only channels it holds, so nothing is held or delivered
twice.  ``ready()`` is true when the map is known, every master's link is
connected and every wanted channel is confirmed by its owner.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import Settings
from ..core.catchup import LatestEvents
from ..core.hub import Hub
from ..core.router import Router
from ..stats import Stats
from . import IEventBus
from .executions import ExecutionResolver, describe_url
from .gate import ClusterGate
from .redis_client import RedisAddress
from .replay import ClusterCatchup
from .shard import ConnectOptions, ShardLink
from .slots import Address, SlotMap, format_address, key_slot, remap_for, seed_nodes
from .store import LatestStore
from .topology import MIN_REFRESH_INTERVAL, SlotMapFeed

log = Logger()


@implementer(IEventBus)
class ClusterBus(Service):
    kind = "redis-cluster"

    def __init__(self, settings: Settings, router: Router, reactor: Any, stats: Stats, hub: Hub, *,
                 resolver: ExecutionResolver | None = None, refresh_interval: float = 30.0,
                 ping_interval: float = 15.0, ping_timeout: float = 10.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.router = router
        self.layout = router.layout
        self._notifications = self.layout.notif_bus + "/"
        self.reactor = reactor
        self.stats = stats
        self.hub = hub
        self.seeds = seed_nodes(settings)
        self.remap = remap_for(settings)
        self.settings = settings
        self.options = ConnectOptions.from_settings(settings)
        self.resolver = resolver or ExecutionResolver(settings.database_url, reactor, timeout=settings.database_timeout)
        # catch-up: the server's cache (router.graph_events), the store in the
        # cluster, channels kept a while after their last socket left
        local = router.graph_events if isinstance(router.graph_events, LatestEvents) else None
        self.store = LatestStore(self._store_route, RedisAddress.from_settings(settings), reactor, stats,
                                 ttl=settings.catchup_max_age, graph_limit=settings.catchup_graph_limit,
                                 max_event=settings.catchup_store_max_event, timeout=self.options.timeout,
                                 moved=lambda address: self.feed.request(self.remap(address))
                                 ) if local is not None and settings.catchup_store else None
        self.catchup = ClusterCatchup(local, self.store, self.layout, stats) if local is not None else None
        self.linger = settings.catchup_linger if local is not None else 0.0
        self.gate = ClusterGate(self, self.resolver, self.catchup, self.options.timeout)
        self.database = describe_url(settings.database_url)
        self.feed = SlotMapFeed(self.seeds, self.remap, self.options, reactor, self._known, self._refreshed,
                                refresh_interval=refresh_interval, rng=rng)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.rng = rng
        self.slots: SlotMap | None = None
        self.links: dict[Address, ShardLink] = {}
        self._wanted: Counter[str] = Counter()  # channel -> keys and users mapping to it
        self._slot: dict[str, int] = {}  # channel -> its hash slot (computed once)
        self._moved_at: dict[str, float] = {}  # channel -> when a MOVED for it was last followed
        self._key_channel: dict[str, str] = {}
        self._placed: dict[str, Address] = {}  # channel -> the link holding it
        self._unplaced: set[str] = set()  # wanted, but no known owner yet
        self._closing: list[Deferred[Any]] = []  # links being closed
        self._publisher: Any = None  # made on demand (the demo executor), closed on stop
        self._lingering: dict[str, Any] = {}  # channel -> the call that drops it

    # -- IEventBus ----------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if not self.running:
            return False, "event bus stopped"
        if self.slots is None:
            return False, f"no cluster slot map: {self.feed.last_error}"
        down = sorted(link.name for link in self.links.values() if not link.connected)
        if down:
            return False, f"shard node(s) not connected: {', '.join(down)}"
        if self._unplaced:
            return False, f"{len(self._unplaced)} channel(s) waiting for a shard owner"
        unconfirmed = sum(link.unconfirmed() for link in self.links.values())
        if unconfirmed:
            return False, f"{unconfirmed} channel(s) not yet subscribed"
        return True, ""

    def describe(self) -> str:
        seeds = ", ".join(format_address(a) for a in self.seeds)
        tls = ", TLS" if self.options.tls else ""
        nodes = "announced addresses" if self.settings.redis_use_announced_address else "the seed host"
        return f"redis-cluster (SSUBSCRIBE, seeds {seeds}{tls}, shards at {nodes}; executions from {self.database})"

    def producer(self) -> tuple[Any, bool]:
        """A publisher for in-process producers (the demo executor): SPUBLISH
        to each channel's owner."""
        if self._publisher is None:
            from .cluster_publish import ClusterPublisher

            self._publisher = ClusterPublisher.from_settings(self.settings, self.reactor)
        return self._publisher, True

    def hand_over(self, timeout: float) -> Deferred[Any]:
        """On a graceful stop, once the sockets are closed: see ClusterGate."""
        return self.gate.hand_over(timeout)

    def startService(self) -> None:
        super().startService()
        self.slots = None
        for state in (self._wanted, self._slot, self._moved_at, self._key_channel, self._placed, self._unplaced):
            state.clear()
        if not self.resolver.database_url:
            log.warn("DATABASE_URL is not set: subscribe_graph_execution cannot be resolved on redis-cluster")
        self.resolver.start()
        if self.catchup is not None:
            self.router.graph_events = self.catchup  # graph events also go to the store
        self.hub.watch(self)
        for user_id in tuple(self.hub.users()):
            self.user_added(user_id)
        for key in tuple(self.hub.keys()):
            self.key_added(key)
        self.feed.start()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.hub.unwatch(self)
        if self.catchup is not None:
            self.router.graph_events = self.catchup.local
        for call in self._lingering.values():
            if call.active():
                call.cancel()
        self._lingering.clear()
        self.gate.stop()
        waits = self.feed.stop() + [link.stop() for link in self.links.values()] + self._closing
        self.links.clear()
        self._closing = []
        if self._publisher is not None:
            waits.append(self._publisher.close())
            self._publisher = None
        if self.store is not None:
            waits.append(self.store.close())
        d = gatherResults(waits, consumeErrors=True)
        d.addBoth(lambda _: self.resolver.stop())
        return d

    # -- the hub's keys and users -------------------------------------------------

    def channel_for_key(self, key: str) -> str | None:
        user_id, _, rest = key.partition("|")
        if rest.startswith("graph_exec#"):
            exec_id = rest[len("graph_exec#"):]
            graph_id = self.resolver.graph_id(user_id, exec_id)
            return None if graph_id is None else self.layout.sharded_exec(user_id, graph_id, exec_id)
        if rest.startswith("graph#") and rest.endswith("|executions"):
            return self.layout.sharded_all(user_id, rest[len("graph#"):-len("|executions")])
        return None

    def key_added(self, key: str) -> None:
        channel = self.channel_for_key(key)
        if channel is None:
            self._resolve_key(key)
            return
        self._key_channel[key] = channel
        self.want(channel)

    def _resolve_key(self, key: str) -> None:
        """An execution key whose graph is not known yet: subscribed before
        this bus started (the kind of Redis was still being found out), or
        forgotten by the lookup cache.  Look it up, then place it if a
        socket still holds it."""
        user_id, _, rest = key.partition("|")
        if not rest.startswith("graph_exec#"):
            log.warn("no shard channel for subscription {key}", key=key)
            return

        def found(known: bool) -> None:
            if known and self.running and self.hub.wants(key) and key not in self._key_channel:
                self.key_added(key)
            elif not known:
                log.info("subscription {key}: no such execution for that user; nothing subscribed", key=key)

        def failed(failure: Failure) -> None:
            log.warn("subscription {key}: execution lookup failed ({error}); nothing subscribed", key=key,
                     error=failure.getErrorMessage())

        self.resolver.resolve(user_id, rest[len("graph_exec#"):]).addCallbacks(found, failed)

    def key_removed(self, key: str) -> None:
        channel = self._key_channel.pop(key, None)
        if channel is not None:
            self.unwant(channel)

    def user_added(self, user_id: str) -> None:
        self.want(self.layout.notification(user_id))

    def user_removed(self, user_id: str) -> None:
        self.unwant(self.layout.notification(user_id))

    # -- channels: wanted (counted), lingering, placed on a shard's link ------------------

    def want(self, channel: str) -> None:
        self._wanted[channel] += 1
        lingering = self._lingering.pop(channel, None)
        if lingering is not None:
            lingering.cancel()  # still subscribed: nothing to do, nothing missed
        elif self._wanted[channel] == 1:
            self._slot[channel] = key_slot(channel)
            self._place(channel)

    def unwant(self, channel: str) -> None:
        left = self._wanted[channel] - 1
        self._wanted[channel] = left
        if left > 0:
            return
        if self.linger > 0 and self.running and not channel.startswith(self._notifications):
            # keep it (and recording its graph events) while its browser reconnects
            self._lingering[channel] = self.reactor.callLater(self.linger, self._drop, channel)
        else:
            self._drop(channel)

    def _drop(self, channel: str) -> None:
        self._lingering.pop(channel, None)
        del self._wanted[channel]
        del self._slot[channel]
        self._unplaced.discard(channel)
        address = self._placed.pop(channel, None)
        link = self.links.get(address) if address is not None else None
        if link is not None:
            link.remove(channel)
        self.gate.channel_gone(channel)

    def confirmed(self, channel: str) -> bool:
        """Whether the channel's shard has confirmed its subscription."""
        address = self._placed.get(channel)
        link = self.links.get(address) if address is not None else None
        return link is not None and channel in link.acked

    def placed(self, channel: str) -> Address | None:
        return self._placed.get(channel)

    def recording(self) -> list[str]:
        """The execution channels held here (wanted or lingering)."""
        return [c for c in self._placed if not c.startswith(self._notifications)]

    def _store_route(self, slot: int) -> Address:
        owner = self.slots.owner(slot) if self.slots is not None else None
        return owner if owner is not None else self.seeds[0]

    # -- placement ------------------------------------------------------------------

    def _link(self, address: Address) -> ShardLink:
        link = self.links.get(address)
        if link is None:
            link = self.links[address] = ShardLink(address, self, self.reactor, self.options, self.stats,
                                                   ping_interval=self.ping_interval,
                                                   ping_timeout=self.ping_timeout, rng=self.rng)
            link.start()
        return link

    def _place(self, channel: str) -> None:
        """Put ``channel`` on its owner's link (off any other one)."""
        owner = self.slots.owner(self._slot[channel]) if self.slots is not None else None
        current = self._placed.get(channel)
        if current is not None and current == owner:
            return
        if current is not None:
            del self._placed[channel]
            if current in self.links:
                self.links[current].remove(channel)
            self.gate.channel_gone(channel)
        if owner is None:
            self._unplaced.add(channel)
            return
        self._unplaced.discard(channel)
        self._placed[channel] = owner
        self._link(owner).add(channel)

    def _apply(self, slots: SlotMap) -> None:
        changed = slots != self.slots
        self.slots = slots
        masters = slots.masters()
        for address in sorted(masters):
            self._link(address)
        if changed:
            for channel in tuple(self._wanted):
                self._place(channel)
        else:
            for channel in tuple(self._unplaced):
                self._place(channel)
        for address in tuple(self.links):
            if address not in masters:
                link = self.links.pop(address)
                log.info("shard node {node} no longer a master: closing its link", node=link.name)
                self._closing.append(link.stop().addBoth(self._closed_link))

    def _closed_link(self, result: object) -> None:
        self._closing = [d for d in self._closing if not d.called]

    # -- what links report ---------------------------------------------------------

    def deliver(self, channel: str, data: bytes) -> None:
        self.router.sharded(channel, data)

    def channel_confirmed(self, link: ShardLink, channel: str) -> None:
        if self._placed.get(channel) == link.address:
            self.gate.channel_confirmed(channel)

    def channel_lost(self, link: ShardLink, channel: str, moved: tuple[int, Address] | None) -> None:
        self.gate.channel_gone(channel)
        if self._placed.get(channel) == link.address:
            del self._placed[channel]
        if channel not in self._wanted:
            return
        self._unplaced.add(channel)
        now = self.reactor.seconds()
        # follow a MOVED at once, but not twice in a row within the refresh
        # interval: nodes that disagree for a moment must not ping-pong
        if moved is not None:
            moved = (moved[0], self.remap(moved[1]))
        if moved is not None and self.slots is not None and self.running \
                and now - self._moved_at.get(channel, float("-inf")) >= MIN_REFRESH_INTERVAL:
            self._moved_at[channel] = now
            slot, address = moved
            self.slots = self.slots.with_owner(slot, address)
            self._place(channel)
            self.feed.request(address)
        else:
            self.feed.request(moved[1] if moved is not None else link.address)

    def link_down(self, link: ShardLink) -> None:
        for channel in link.channels:
            self.gate.channel_gone(channel)
        self.feed.request()

    # -- the slot map ---------------------------------------------------------------

    @property
    def refreshes(self) -> int:
        """Slot maps fetched."""
        return self.feed.refreshes

    def _known(self) -> tuple[list[Address], list[Address]]:
        up = [a for a, link in self.links.items() if link.connected]
        return up, [a for a in self.links if a not in up]

    def _refreshed(self, slots: SlotMap) -> None:
        horizon = self.reactor.seconds() - MIN_REFRESH_INTERVAL
        self._moved_at = {c: t for c, t in self._moved_at.items() if t > horizon}
        self._apply(slots)
