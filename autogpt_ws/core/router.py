"""From a bus message to frames in the hub: bus -> router -> hub -> socket.

The router decides from the channel name alone whether anyone on this
server could want a message; when nobody does it is counted and dropped
without decoding its JSON.  Otherwise a message over ``max_size`` bytes
(``max_message_size_limit``) is dropped, and any other one opened once,
checked against its channel, and made into one frame per channel key (the
event's bytes spliced in as they were published) for the hub.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

from twisted.logger import Logger

from ..stats import Stats
from . import wire
from .channels import Layout, Parsed
from .hub import Hub

log = Logger()

# Bytes every graph event carries; a cheap pre-filter for the catch-up cache
# (a node event carrying it nested is decoded, then recognised and skipped).
GRAPH_MARK = b'"graph_execution_update"'


# How producers write a node event: AutoGPT's (pydantic, the subclass field
# last) and ours end with it; some clients put it first.  An event with
# either end is plainly a node event, with no need to scan it for GRAPH_MARK.
NODE_TAIL = b'"event_type":"node_execution_update"}}'
NODE_HEAD = b'{"payload":{"event_type":"node_execution_update"'


_TAIL, _HEAD = len(NODE_TAIL), len(NODE_HEAD)


class GraphEventSink(Protocol):
    """Where graph events go besides sockets (the catch-up cache)."""

    def record(self, user_id: str, graph_id: str, graph_exec_id: str, status: str, event: bytes) -> object: ...


class Router:
    def __init__(self, hub: Hub, stats: Stats, layout: Layout,
                 observe_latency: Callable[[float], None] | None = None,
                 graph_events: GraphEventSink | None = None,
                 timer: Callable[[], float] = time.perf_counter, max_size: int = 0) -> None:
        self.hub = hub
        self.max_size = max_size or float("inf")  # 0: no limit
        self.stats = stats
        self.layout = layout
        self.graph_events = graph_events
        self._observe = observe_latency
        self._timer = timer
        # users with a socket here, as the bytes channels carry them
        self._users: set[bytes] = {user.encode("utf-8") for user in hub.users()}
        self._exec_bus = layout.exec_bus.encode("utf-8")
        hub.watch(self)

    # -- HubWatcher: which users have a socket here ---------------------------

    def user_added(self, user_id: str) -> None:
        self._users.add(user_id.encode("utf-8"))

    def user_removed(self, user_id: str) -> None:
        self._users.discard(user_id.encode("utf-8"))

    def key_added(self, key: str) -> None:
        pass

    def key_removed(self, key: str) -> None:
        pass

    # -- entry points for the buses -----------------------------------------

    def classic(self, channel: str, data: bytes) -> None:
        """A message from a classic (PSUBSCRIBE) or in-memory bus."""
        parsed = self.layout.parse_classic(channel)
        if parsed is None:
            self._drop("bad_channel", channel)
        elif parsed.kind == "exec":
            self.execution(parsed, data, sharded=False)
        else:
            self.notification(parsed.user_id, data)

    def classic_bytes(self, channel: bytes, data: bytes) -> None:
        """The classic Redis bus's entry point: an execution event of a user
        with no socket here is counted and dropped from the channel bytes
        alone (no channel decoding or parsing, no keys built), unless the
        catch-up cache may want it (it could be a graph event).  Same
        outcome as :meth:`classic`, which handles everything else."""
        # one split(), and slices compared with ==: fewer calls than
        # find/count or endswith/startswith.  The channel must have exactly
        # the shape parse_classic accepts.
        parts = channel.split(b"/")
        if len(parts) == 4:
            bus, user, graph, execution = parts
            if (user not in self._users and bus == self._exec_bus and user and graph and execution
                    and (self.graph_events is None or data[-_TAIL:] == NODE_TAIL or data[:_HEAD] == NODE_HEAD
                         or GRAPH_MARK not in data)):
                self.stats.events_ignored += 1
                return
        self.classic(channel.decode("utf-8", "replace"), data)

    def sharded(self, channel: str, data: bytes) -> None:
        """A message from the sharded (SSUBSCRIBE) cluster bus."""
        parsed = self.layout.parse_sharded(channel)
        if parsed is None:
            self._drop("bad_channel", channel)
        elif parsed.kind == "notification":
            self.notification(parsed.user_id, data)
        else:
            self.execution(parsed, data, sharded=True)

    # -- routing ------------------------------------------------------------

    def execution(self, where: Parsed, data: bytes, sharded: bool) -> None:
        started = self._timer()
        stats = self.stats
        user_id = where.user_id
        exec_key = wire.exec_key(user_id, where.graph_exec_id) if where.kind == "exec" else None
        graph_key = wire.graph_key(user_id, where.graph_id)
        hub = self.hub
        # on the sharded bus a channel serves exactly one key
        if sharded:
            if where.kind == "all":
                exec_key = None
            else:
                graph_key = None
        wanted = (exec_key is not None and hub.wants(exec_key)) or (graph_key is not None and hub.wants(graph_key))
        # a graph event nobody here holds still goes to the catch-up cache
        # (classic bus: every event; sharded: a channel kept a while after
        # its last socket left, or one a subscribe is waiting on)
        if not wanted and (self.graph_events is None or GRAPH_MARK not in data):
            stats.events_ignored += 1
            return
        stats.events_handled += 1
        if len(data) > self.max_size:
            self._drop("oversized", user_id)
            return
        opened = self._open(data)
        if opened is None:
            return
        event, raw = opened
        kind = event.get("event_type")
        if kind == wire.GRAPH_UPDATE:
            if not self._matches(event, where, ("user_id", "graph_id", "id")):
                return
            if self.graph_events is not None:
                run = where.graph_exec_id or event.get("id")  # a graph's /all channel names no run
                if not isinstance(run, str) or not run:
                    self._drop("malformed", user_id)
                    return
                status = event.get("status")
                self.graph_events.record(user_id, where.graph_id, run, status if isinstance(status, str) else "", raw)
            keys = (exec_key, graph_key)
        elif kind == wire.NODE_UPDATE:
            if not self._matches(event, where, ("user_id", "graph_id", "graph_exec_id")):
                return
            keys = (exec_key, graph_key) if sharded else (exec_key, None)
        else:
            self._drop("oversized" if kind == "error_comms_update" else "unknown_type", user_id)
            return
        self._deliver(wire.EVENT_METHODS[kind], keys, raw, started)

    def notification(self, user_id: str, data: bytes) -> None:
        started = self._timer()
        if not self.hub.has_user(user_id):
            self.stats.events_ignored += 1
            return
        self.stats.events_handled += 1
        if len(data) > self.max_size:
            self._drop("oversized", user_id)
            return
        try:
            event, _inner, raw = wire.inner_payload(data)
        except ValueError:
            self._drop("malformed", user_id)
            return
        if event.get("user_id", user_id) != user_id:
            self._drop("channel_mismatch", user_id)
            return
        sent = self.hub.notify(user_id, wire.OutFrame(wire.push(wire.NOTIFICATION, None, raw)))
        self._count(sent, started)

    # -- helpers ------------------------------------------------------------

    def _open(self, data: bytes) -> tuple[dict[str, Any], bytes] | None:
        try:
            return wire.open_envelope(data)
        except ValueError:
            self._drop("malformed", "")
            return None

    def _matches(self, event: dict[str, Any], where: Parsed, fields: tuple[str, str, str]) -> bool:
        """The event's own ids must be those of its channel: a socket never
        receives another user's events, whatever a producer puts where."""
        expected = (where.user_id, where.graph_id, where.graph_exec_id)
        for field, value in zip(fields, expected):
            if value and event.get(field) != value:
                self._drop("channel_mismatch", where.user_id)
                return False
        return True

    def _deliver(self, method: str, keys: tuple[str | None, str | None], raw: bytes, started: float) -> None:
        hub = self.hub
        sent = 0
        for key in keys:
            if key is not None and hub.wants(key):
                sent += hub.publish(key, wire.OutFrame(wire.push(method, key, raw)))
        self._count(sent, started)

    def _count(self, sent: int, started: float) -> None:
        if sent:
            self.stats.events_forwarded += 1
            if self._observe is not None:
                self._observe(self._timer() - started)

    def _drop(self, reason: str, where: str) -> None:
        self.stats.events_dropped[reason] += 1
        log.debug("event dropped ({reason}) on {where}", reason=reason, where=where)
