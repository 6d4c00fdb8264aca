"""The catch-up store: the latest graph event of each execution, kept in the
Redis Cluster itself, so another instance, or this one after a restart, can
replay it.

Written by the instances subscribed to an execution's channels, for each
graph event they receive that is news to them; never for node events, never
for executions nobody here subscribed to.  Keys live in the slot of the
execution's channels (the hash tag ``{<user>/<graph>}``), so each write and
read goes to one node, the one already serving those channels::

    autogpt-ws:catchup/{<user>/<graph>}/latest/<exec>   STRING: the event's bytes, EX ttl
    autogpt-ws:catchup/{<user>/<graph>}/runs            ZSET: exec -> write time (ms), EX ttl,
                                                         the graph_limit newest kept

A write is one command (a short Lua script doing SET, ZADD,
ZREMRANGEBYRANK, EXPIRE) on one ordinary (non-subscriber) connection per
master, fire and forget.  A read is GET +
ZSCORE (one execution) or ZRANGE then MGET (a graph).  Every command is
counted; a failure (a node down, MOVED, an ACL refusal) is counted and never
touches live delivery.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from ..stats import Stats
from .redis_client import RedisAddress, RedisPublisher
from .resp import RedisError
from .shard import moved_target
from .slots import Address, key_slot

log = Logger()

PREFIX = "autogpt-ws:catchup"


# A write, as one command (the keys share a slot): the event with its TTL;
# the run in the graph's index, trimmed to the graph_limit newest, same TTL.
WRITE = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local limit = tonumber(ARGV[5])
if limit > 0 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -limit - 1)
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
"""


def latest_key(user_id: str, graph_id: str, graph_exec_id: str) -> str:
    return f"{PREFIX}/{{{user_id}/{graph_id}}}/latest/{graph_exec_id}"


def runs_key(user_id: str, graph_id: str) -> str:
    return f"{PREFIX}/{{{user_id}/{graph_id}}}/runs"


class LatestStore:
    def __init__(self, route: Callable[[int], Address], address: RedisAddress, reactor: Any, stats: Stats, *,
                 ttl: float, graph_limit: int, max_event: int, timeout: float,
                 moved: Callable[[Address], None] = lambda address: None) -> None:
        """``route(slot)`` names the master serving a slot; ``address``
        carries the credentials and TLS every node takes; ``moved`` hears
        of a MOVED (the slot map is stale)."""
        self._route = route
        self._address = address
        self._reactor = reactor
        self._stats = stats
        self._ttl = max(1, math.ceil(ttl))
        self._graph_limit = graph_limit
        self._max_event = max_event
        self._timeout = timeout
        self._moved = moved
        self._nodes: dict[Address, RedisPublisher] = {}

    # -- writing ----------------------------------------------------------------

    def write(self, user_id: str, graph_id: str, graph_exec_id: str, event: bytes) -> None:
        """Keep ``event`` as the latest of its execution (fire and forget)."""
        if len(event) > self._max_event:
            self._stats.catchup_store_skipped += 1
            return
        latest = latest_key(user_id, graph_id, graph_exec_id)
        self._stats.catchup_store_writes += 1
        self._stats.catchup_store_commands += 1
        # one command, no timer: a write is fire and forget, and a lost
        # connection fails what it had pending
        node = self.node(self._route(key_slot(latest)))
        node.command("EVAL", WRITE, 2, latest, runs_key(user_id, graph_id), event, self._ttl,
                     int(self._reactor.seconds() * 1000), graph_exec_id, self._graph_limit
                     ).addErrback(self._unwrap).addErrback(self._failed, "write")

    # -- reading ----------------------------------------------------------------

    def read_execution(self, user_id: str, graph_id: str, graph_exec_id: str
                       ) -> Deferred[tuple[bytes, float | None] | None]:
        """(event, written at in s, if indexed) or None; fails when the store
        cannot answer."""
        latest = latest_key(user_id, graph_id, graph_exec_id)
        self._stats.catchup_store_reads += 1
        d = self._run(latest, [("GET", latest), ("ZSCORE", runs_key(user_id, graph_id), graph_exec_id)])

        def answer(replies: list[Any]) -> tuple[bytes, float | None] | None:
            event, score = replies
            if not isinstance(event, bytes):
                return None
            return event, float(score) / 1000 if score is not None else None

        return d.addCallback(answer)

    def read_graph(self, user_id: str, graph_id: str) -> Deferred[list[tuple[str, bytes, float]]]:
        """The graph_limit most recently written runs of a graph, newest
        first: (exec id, event, written at in s)."""
        if not self._graph_limit:
            return succeed([])
        runs = runs_key(user_id, graph_id)
        self._stats.catchup_store_reads += 1
        d = self._run(runs, [("ZRANGE", runs, "+inf", "-inf", "BYSCORE", "REV", "LIMIT", 0, self._graph_limit,
                              "WITHSCORES")])

        def events(replies: list[Any]) -> Deferred[list[tuple[str, bytes, float]]] | list[Any]:
            flat = replies[0]
            pairs = [(flat[i].decode("utf-8", "replace"), float(flat[i + 1]) / 1000) for i in range(0, len(flat), 2)]
            if not pairs:
                return []
            keys = [latest_key(user_id, graph_id, run) for run, _ in pairs]
            fetched = self._run(runs, [("MGET", *keys)])
            return fetched.addCallback(lambda got: [(run, event, at) for (run, at), event in zip(pairs, got[0])
                                                    if isinstance(event, bytes)])

        return d.addCallback(events)

    # -- plumbing -----------------------------------------------------------------

    def node(self, address: Address) -> RedisPublisher:
        """The command connection to one master (made on first use)."""
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = RedisPublisher(
                replace(self._address, host=address[0], port=address[1], db=0), self._reactor,
                name="autogpt-ws-store")
        return node

    def _run(self, key: str, commands: list[tuple[Any, ...]]) -> Deferred[list[Any]]:
        """Pipeline ``commands`` on the node serving ``key``'s slot; fires
        with their replies, bounded by the timeout."""
        node = self.node(self._route(key_slot(key)))
        self._stats.catchup_store_commands += len(commands)
        d = gatherResults([node.command(*command) for command in commands], consumeErrors=True)
        d.addTimeout(self._timeout, self._reactor)
        return d.addErrback(self._unwrap)

    def _unwrap(self, failure: Any) -> Any:
        cause = getattr(failure.value, "subFailure", None)  # gatherResults wraps the first failure
        if cause is not None:
            failure = cause
        if failure.check(RedisError):
            moved = moved_target(failure.getErrorMessage())
            if moved is not None:
                self._moved(moved[1])
        return failure

    def _failed(self, failure: Any, what: str) -> None:
        self._stats.catchup_store_errors += 1
        log.debug("catch-up store {what} failed: {error}", what=what, error=failure.getErrorMessage())

    def close(self) -> Deferred[Any]:
        closing = [node.close() for node in self._nodes.values()]
        self._nodes.clear()
        return gatherResults(closing, consumeErrors=True)
