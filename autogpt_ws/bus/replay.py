"""Catch-up on the sharded bus: what a subscribe replays, and where it is
found.

A server on the sharded bus hears only the channels it subscribes to, so
its own cache (:class:`~autogpt_ws.core.catchup.LatestEvents`) knows a channel's
latest events only from the moment the channel was confirmed on its shard.
What came before is in the store (:mod:`store`): the instances that were
subscribed wrote it there, this one included before a restart.  So:

- ``record`` (the router's GraphEventSink) keeps a graph event in the
  cache and, when it is news, writes it to the store;
- the cluster bus says when a channel is confirmed on its shard
  (``live``) and when it no longer is (``gone``: unsubscribed, moved, its
  node lost);
- ``replay`` gives the frames a subscribe pushes right after its reply.  A
  channel already *seeded* since it was confirmed is answered from the
  cache at once.  Otherwise the store is read, and each execution found
  there is taken into the cache unless this server recorded it after the
  channel was confirmed (that one came live, so it is newer); then the
  channel is seeded and the cache answers.  A store that cannot answer
  leaves the cache as it is: the miss is counted, live delivery goes on.

Ordering: the subscribing socket joins the hub only when the replay is
known, in the same call as its reply and replayed frames, so everything
live reaches it after them; events that came between the confirmation and
then were recorded in the cache, which the replay reads last.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..core import wire
from ..core.catchup import LatestEvents
from ..core.channels import Layout, Parsed
from ..stats import Stats
from .store import LatestStore

log = Logger()


def status_of(event: bytes) -> str | None:
    """The ``status`` of a graph event's bytes; None when they are not one."""
    try:
        decoded = json.loads(event)
    except ValueError:
        return None
    status = decoded.get("status") if isinstance(decoded, dict) else None
    return status if isinstance(status, str) else ""


class ClusterCatchup:
    def __init__(self, local: LatestEvents, store: LatestStore | None, layout: Layout, stats: Stats) -> None:
        self.local = local
        self.store = store
        self.layout = layout
        self.stats = stats
        self._live: dict[str, float] = {}  # channel -> when it was confirmed on its shard
        self._seeded: set[str] = set()  # channels whose cache is complete since then

    # -- the router's GraphEventSink ---------------------------------------------------

    def record(self, user_id: str, graph_id: str, graph_exec_id: str, status: str, event: bytes) -> bool:
        news = self.local.record(user_id, graph_id, graph_exec_id, status, event)
        if news and self.store is not None:
            self.store.write(user_id, graph_id, graph_exec_id, event)
        return news

    # -- what the cluster bus says ----------------------------------------------------

    def live(self, channel: str, at: float) -> None:
        self._live[channel] = at
        self._seeded.discard(channel)

    def gone(self, channel: str) -> None:
        self._live.pop(channel, None)
        self._seeded.discard(channel)

    # -- replay ---------------------------------------------------------------------

    def replay(self, channel: str, key: str) -> Deferred[list[wire.OutFrame]]:
        """The frames to push after the reply to a subscribe of ``key``,
        whose shard channel is ``channel``."""
        where = self.layout.parse_sharded(channel)
        if where is None or where.kind == "notification":
            return succeed([])
        if channel in self._seeded or self.store is None:
            return succeed(self._frames(where, key))
        since = self._live.get(channel)
        d: Deferred[Any]
        if where.kind == "exec":
            d = self.store.read_execution(where.user_id, where.graph_id, where.graph_exec_id)
            d.addCallback(lambda found: [] if found is None else [(where.graph_exec_id, *found)])
        else:
            d = self.store.read_graph(where.user_id, where.graph_id)
        d.addCallbacks(self._seed, self._unread, callbackArgs=(where, channel, since), errbackArgs=(channel,))
        return d.addCallback(lambda _: self._frames(where, key))

    def _seed(self, runs: list[tuple[str, bytes, float | None]], where: Parsed, channel: str,
              since: float | None) -> None:
        local = self.local
        for run, event, written_at in runs:
            mine = local.updated_at(where.user_id, run)
            if since is not None and mine is not None and mine >= since:
                continue  # recorded live here after the channel was confirmed: newer
            status = status_of(event)
            if status is not None:
                local.restore(where.user_id, where.graph_id, run, status, event, written_at)
        if since is not None and self._live.get(channel) == since:
            self._seeded.add(channel)  # still the same confirmation: the cache is complete

    def _unread(self, failure: Failure, channel: str) -> None:
        self.stats.catchup_store_errors += 1
        log.info("catch-up store unreadable for {channel} ({error}); replaying what this server holds",
                 channel=channel, error=failure.getErrorMessage() or failure.type.__name__)

    def _frames(self, where: Parsed, key: str) -> list[wire.OutFrame]:
        if where.kind == "exec":
            return self.local.for_execution(where.user_id, where.graph_exec_id, key)
        return self.local.for_graph(where.user_id, where.graph_id, key)
