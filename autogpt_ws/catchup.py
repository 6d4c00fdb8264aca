"""Catch-up on subscribe (extension): the latest graph event per execution.

Redis pub/sub keeps nothing, so a browser that reconnects after a run ended
never hears ``COMPLETED`` and shows the run stuck at RUNNING.  Every server
on the classic or in-memory bus sees every graph event, so it keeps the
latest one of each execution (bytes as published) and replays it right
after a subscribe reply, exactly as a live event on that key would be sent.

Bounded by bytes and by age; the least recently updated execution goes
first.  Only graph events are kept: node events are many and a reconnecting
client needs the run's state, not its history.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from . import wire
from .config import Settings
from .metrics import Stats

FINAL = frozenset(("COMPLETED", "TERMINATED", "FAILED"))
ENTRY_OVERHEAD = 320  # dict slots, tuple, key strings: measured order of magnitude per entry


class _Entry:
    __slots__ = ("user_id", "graph_id", "status", "event", "updated_at", "size", "seq")

    def __init__(self, user_id: str, graph_id: str, status: str, event: bytes, updated_at: float,
                 size: int, seq: int) -> None:
        self.user_id = user_id
        self.graph_id = graph_id
        self.status = status
        self.event = event
        self.updated_at = updated_at
        self.size = size
        self.seq = seq  # update order, for ties of updated_at


class LatestEvents:
    def __init__(self, settings: Settings, clock: Any, stats: Stats) -> None:
        self._max_bytes = settings.catchup_max_bytes
        self._max_age = settings.catchup_max_age
        self._recent_final = settings.catchup_recent_final
        self._graph_limit = settings.catchup_graph_limit
        self._clock = clock
        self._stats = stats
        # (user_id, graph_exec_id) -> entry, least recently updated first
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        # (user_id, graph_id) -> graph_exec_ids in the cache
        self._by_graph: dict[tuple[str, str], set[str]] = {}
        self.bytes = 0
        self._seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    # -- writing (from the router) ----------------------------------------------

    def record(self, user_id: str, graph_id: str, graph_exec_id: str, status: str, event: bytes) -> None:
        key = (user_id, graph_exec_id)
        size = len(event) + len(graph_exec_id) + len(user_id) + len(graph_id) + ENTRY_OVERHEAD
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
            if old.graph_id != graph_id:
                self._unindex(user_id, old.graph_id, graph_exec_id)
        if size > self._max_bytes:
            return  # larger than the whole cache: keep nothing rather than everything else
        self._seq += 1
        self._entries[key] = _Entry(user_id, graph_id, status, event, self._clock.seconds(), size, self._seq)
        self._by_graph.setdefault((user_id, graph_id), set()).add(graph_exec_id)
        self.bytes += size
        self._evict()

    def _evict(self) -> None:
        entries = self._entries
        horizon = self._clock.seconds() - self._max_age
        while entries:
            key, oldest = next(iter(entries.items()))
            if self.bytes <= self._max_bytes and oldest.updated_at >= horizon:
                break
            del entries[key]
            self.bytes -= oldest.size
            self._unindex(oldest.user_id, oldest.graph_id, key[1])
            self._stats.catchup_evictions += 1

    def _unindex(self, user_id: str, graph_id: str, graph_exec_id: str) -> None:
        ids = self._by_graph.get((user_id, graph_id))
        if ids is not None:
            ids.discard(graph_exec_id)
            if not ids:
                del self._by_graph[(user_id, graph_id)]

    # -- reading (from a session, right after its subscribe reply) --------------

    def for_execution(self, user_id: str, graph_exec_id: str, key: str) -> list[wire.OutFrame]:
        self._evict()
        entry = self._entries.get((user_id, graph_exec_id))
        if entry is None:
            self._stats.catchup_misses += 1
            return []
        self._stats.catchup_hits += 1
        return [wire.OutFrame(wire.push(wire.GRAPH_EVENT, key, entry.event))]

    def for_graph(self, user_id: str, graph_id: str, key: str) -> list[wire.OutFrame]:
        """Runs of the graph still going, plus those that ended in the last
        ``catchup_recent_final`` seconds; the newest ``catchup_graph_limit``,
        sent oldest first."""
        self._evict()
        ids = self._by_graph.get((user_id, graph_id), ())
        recent = self._clock.seconds() - self._recent_final
        chosen = [
            entry for entry in (self._entries[(user_id, i)] for i in ids)
            if entry.status not in FINAL or entry.updated_at >= recent
        ]
        if not chosen:
            self._stats.catchup_misses += 1
            return []
        self._stats.catchup_hits += 1
        chosen.sort(key=lambda entry: entry.seq)
        chosen = chosen[-self._graph_limit:] if self._graph_limit else []
        return [wire.OutFrame(wire.push(wire.GRAPH_EVENT, key, entry.event)) for entry in chosen]
