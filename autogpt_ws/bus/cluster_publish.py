"""SPUBLISH on a Redis Cluster, for the demo executor and ``autogpt-ws
publish --sharded`` (AutoGPT's executors publish with their own client).

Each channel goes to the node that owns its slot, first the seed node and
then whatever a ``MOVED`` reply names (reached as REDIS_USE_ANNOUNCED_ADDRESS
says), remembered per slot.  A ``MOVED``
reply means the command did not run, so sending it once more, to the named
node, can never deliver an event twice.  During a slot migration Redis
(7.0) serves ``SPUBLISH`` on the slot's old owner, so there is no ``ASK`` to
follow.  Any other error reply (``CLUSTERDOWN``, ``TRYAGAIN``) fails the
publish, which is never retried.

One publish at a time, in call order: this is a tool's publisher, for
events of one run that must arrive in order, not a bulk one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, inlineCallbacks

from ..config import Settings
from .redis_client import RedisAddress, RedisPublisher
from .resp import RedisError
from .shard import moved_target
from .slots import Address, Remap, key_slot, remap_for, seed_nodes

MAX_REDIRECTS = 5


class ClusterPublisher:
    def __init__(self, seed: RedisAddress, reactor: Any, remap: Remap | None = None) -> None:
        self.seed = seed
        self.reactor = reactor
        self.remap: Remap = remap or (lambda address: address)
        self.redirects = 0  # MOVED replies followed
        self._nodes: dict[Address, RedisPublisher] = {}
        self._owner: dict[int, Address] = {}  # slot -> node, from MOVED replies
        self._lock = DeferredLock()

    @classmethod
    def from_settings(cls, settings: Settings, reactor: Any = None) -> "ClusterPublisher":
        """The first seed node of the redis-cluster settings, with their TLS
        and credentials (a cluster has only database 0)."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        host, port = seed_nodes(settings)[0]
        seed = replace(RedisAddress.from_settings(settings), host=host, port=port, db=0)
        return cls(seed, reactor, remap_for(settings))

    def publish(self, channel: str, data: bytes) -> Deferred[int]:
        """Fires with Redis's receiver count, or fails (with RedisError for
        an error reply other than MOVED, or after MAX_REDIRECTS of them)."""
        return self._lock.run(self._publish, channel, data)

    @inlineCallbacks
    def _publish(self, channel: str, data: bytes) -> Any:
        slot = key_slot(channel)
        address = self._owner.get(slot, (self.seed.host, self.seed.port))
        for _ in range(MAX_REDIRECTS + 1):
            try:
                receivers = yield self._node(address).publish(channel, data)
                return receivers
            except RedisError as exc:
                moved = moved_target(str(exc))
                if moved is None:
                    raise
                self.redirects += 1
                address = self._owner[moved[0]] = self.remap(moved[1])
        raise RedisError(f"SPUBLISH {channel}: more than {MAX_REDIRECTS} MOVED replies")

    def _node(self, address: Address) -> RedisPublisher:
        node = self._nodes.get(address)
        if node is None:
            host, port = address
            node = self._nodes[address] = RedisPublisher(replace(self.seed, host=host, port=port), self.reactor,
                                                         sharded=True)
        return node

    def close(self) -> Deferred[None]:
        closing = [node.close() for node in self._nodes.values()]
        self._nodes.clear()
        return DeferredList(closing).addCallback(lambda _: None)
