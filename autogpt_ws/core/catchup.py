"""Catch-up on subscribe (extension): the latest graph event per execution.

Redis pub/sub keeps nothing, so a browser that reconnects after a run ended
never hears ``COMPLETED`` and shows the run stuck at RUNNING.  Every server
on the classic or in-memory bus sees every event, so it keeps the latest
``graph_execution_update`` of each execution (the event's bytes as
published) and replays it right after a subscribe reply, exactly as a live
event on that key would be sent.

Bounds: total accounted bytes (``catchup_max_bytes``) and age
(``catchup_max_age``); the least recently *updated* execution goes first.
``bytes`` accounts what is really held: each entry's event bytes and id
plus a measured per-entry overhead, and each (user, graph) index's ids plus
a measured overhead (tests/test_catchup.py checks the memory really held
against it with tracemalloc, for one graph per run and for a shared
graph).  Only graph events are kept: node events are many, and a
reconnecting client needs the run's state, not its history.  Reads never
reorder: a subscribe does not keep an execution alive.

Ordering.  Everything here runs on the reactor thread.  The router records
an event *before* it delivers it to any socket, in the same call, and a
session subscribes its socket, sends the reply and pushes the cached frames
in one call too.  So for a socket and an execution, either the event was
recorded before the subscribe (it is, or is older than, what the cache
holds, and the socket was not yet subscribed to get it live) or it comes
after (it is delivered live, after the reply and the cached frame).  The
cached frame is therefore always the newest event the socket has seen on
that key when it is written, and nothing older follows anything newer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from ..config import Settings
from ..stats import Stats
from . import wire

FINAL = frozenset(("COMPLETED", "TERMINATED", "FAILED"))

# Memory held besides the event's bytes and the id characters, measured
# with tracemalloc on CPython 3.11 and rounded up; the memory test in
# tests/test_catchup.py keeps these honest.
# Per execution: the entry object and its floats, the key tuple, the id's
# str header, the bytes header, its slots in the LRU OrderedDict (with its
# node) and in its graph's index.
ENTRY_OVERHEAD = 400
# Per (user, graph) with at least one execution held: the index dict, its
# tuple key, the user and graph id strs, its slot in the graph table.
GRAPH_OVERHEAD = 450


class Clock(Protocol):
    def seconds(self) -> float: ...


class _Entry:
    __slots__ = ("event", "graph", "updated_at", "final_at")

    def __init__(self, event: bytes, graph: tuple[str, str], updated_at: float, final_at: float | None) -> None:
        self.event = event
        self.graph = graph  # (user_id, graph_id), shared with the per-graph index
        self.updated_at = updated_at
        self.final_at = final_at  # when it reached a final state; None while running


class _Runs(dict[str, _Entry]):
    """One user's graph: graph_exec_id -> entry, least recently updated
    first; ``graph`` is the (user_id, graph_id) key, shared by its entries."""

    __slots__ = ("graph",)

    def __init__(self, graph: tuple[str, str]) -> None:
        super().__init__()
        self.graph = graph


def entry_cost(graph_exec_id: str, event: bytes) -> int:
    """Accounted bytes of one cached execution."""
    return len(event) + len(graph_exec_id) + ENTRY_OVERHEAD


def graph_cost(user_id: str, graph_id: str) -> int:
    """Accounted bytes of the index of one user's graph."""
    return len(user_id) + len(graph_id) + GRAPH_OVERHEAD


class LatestEvents:
    """The latest graph event of each execution, per user.

    ``record`` is the router's :class:`~autogpt_ws.core.router.GraphEventSink`;
    ``for_execution`` and ``for_graph`` are the session's ``Catchup``.
    """

    def __init__(self, settings: Settings, clock: Clock, stats: Stats) -> None:
        self._max_bytes = settings.catchup_max_bytes
        self._max_age = settings.catchup_max_age
        self._recent_final = settings.catchup_recent_final
        self._graph_limit = settings.catchup_graph_limit
        self._clock = clock
        self._stats = stats
        # (user_id, graph_exec_id) -> entry, least recently updated first
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        # (user_id, graph_id) -> its runs in the cache
        self._by_graph: dict[tuple[str, str], _Runs] = {}
        self._bytes = 0
        self._now = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Accounted bytes held, after dropping what has aged out (the
        metrics gauge reads this, so a quiet server still lets go)."""
        self.expire()
        return self._bytes

    def _time(self) -> float:
        # never backwards, so the LRU order is also the order of updated_at
        now = self._clock.seconds()
        if now > self._now:
            self._now = now
        return self._now

    # -- writing (from the router, before the event is delivered) ----------------

    def record(self, user_id: str, graph_id: str, graph_exec_id: str, status: str, event: bytes) -> bool:
        """Keep ``event`` as the latest of its execution. ``status`` is the
        event's ``status`` ("" when it has none).  True when it is news: not
        the bytes already held (a graph event comes twice on the sharded bus
        to a server holding both of its channels)."""
        key = (user_id, graph_exec_id)
        held = self._entries.get(key)
        news = held is None or held.event != event
        self._put(key, graph_id, status, event, self._time(), None)
        return news

    def restore(self, user_id: str, graph_id: str, graph_exec_id: str, status: str, event: bytes,
                final_at: float | None) -> None:
        """Keep ``event``, read back from the store, as the latest of its
        execution; ``final_at`` is when the store says it was written (the
        end of a run that is over)."""
        self._put((user_id, graph_exec_id), graph_id, status, event, self._time(), final_at)

    def updated_at(self, user_id: str, graph_exec_id: str) -> float | None:
        """When this server last recorded (or restored) the execution."""
        entry = self._entries.get((user_id, graph_exec_id))
        return entry.updated_at if entry is not None else None

    def _put(self, key: tuple[str, str], graph_id: str, status: str, event: bytes, now: float,
             final_at: float | None) -> None:
        user_id, graph_exec_id = key
        old = self._entries.pop(key, None)
        if status in FINAL:
            if old is not None and old.final_at is not None:
                final_at = old.final_at
            elif final_at is None:
                final_at = now
        else:
            final_at = None
        if old is not None:
            self._forget(key, old)
        gkey = (user_id, graph_id)
        runs = self._by_graph.get(gkey)
        cost = entry_cost(graph_exec_id, event)
        if cost + (graph_cost(user_id, graph_id) if runs is None else 0) > self._max_bytes:
            # larger than the whole cache: keep nothing (not a stale older
            # state either) rather than flush everything else
            if old is not None:
                self._stats.catchup_evictions += 1
            return
        if runs is None:
            runs = self._by_graph[gkey] = _Runs(gkey)
            self._bytes += graph_cost(user_id, graph_id)
        else:
            gkey = runs.graph  # share the index's strs
            key = (gkey[0], graph_exec_id)
        entry = _Entry(event, gkey, now, final_at)
        self._entries[key] = entry
        runs[graph_exec_id] = entry
        self._bytes += cost
        self._evict(now)

    def expire(self) -> None:
        """Drop entries older than ``catchup_max_age``."""
        if self._entries:
            self._evict(self._time())

    def _evict(self, now: float) -> None:
        entries = self._entries
        horizon = now - self._max_age
        while entries:
            key, oldest = next(iter(entries.items()))
            if self._bytes <= self._max_bytes and oldest.updated_at >= horizon:
                break
            del entries[key]
            self._forget(key, oldest)
            self._stats.catchup_evictions += 1

    def _forget(self, key: tuple[str, str], entry: _Entry) -> None:
        """Undo an entry's index and bytes (it is already out of _entries)."""
        self._bytes -= entry_cost(key[1], entry.event)
        runs = self._by_graph.get(entry.graph)
        if runs is not None:
            runs.pop(key[1], None)
            if not runs:
                del self._by_graph[entry.graph]
                self._bytes -= graph_cost(*entry.graph)

    # -- reading (from a session, right after its subscribe reply) ----------------

    def for_execution(self, user_id: str, graph_exec_id: str, key: str) -> list[wire.OutFrame]:
        """The frame to push after ``subscribe_graph_execution``: the
        execution's latest event on channel ``key``, or nothing."""
        self.expire()
        entry = self._entries.get((user_id, graph_exec_id))
        if entry is None:
            self._stats.catchup_misses += 1
            return []
        self._stats.catchup_hits += 1
        return [wire.OutFrame(wire.push(wire.GRAPH_EVENT, key, entry.event))]

    def for_graph(self, user_id: str, graph_id: str, key: str) -> list[wire.OutFrame]:
        """The frames to push after ``subscribe_graph_executions``: the
        latest event of each run of the graph still going, and of each run
        that reached a final state in the last ``catchup_recent_final``
        seconds; the ``catchup_graph_limit`` most recently updated of them,
        sent oldest first."""
        self.expire()
        runs = self._by_graph.get((user_id, graph_id))
        chosen: list[_Entry] = []
        if runs and self._graph_limit:
            recent = self._time() - self._recent_final
            for entry in reversed(runs.values()):  # newest first
                if entry.final_at is None or entry.final_at >= recent:
                    chosen.append(entry)
                    if len(chosen) >= self._graph_limit:
                        break
        if not chosen:
            self._stats.catchup_misses += 1
            return []
        self._stats.catchup_hits += 1
        return [wire.OutFrame(wire.push(wire.GRAPH_EVENT, key, entry.event)) for entry in reversed(chosen)]
