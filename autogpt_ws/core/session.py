"""One socket's inbound logic: a client frame in, at most one reply out.

Knows the protocol (through :mod:`wire`) and the hub, not the transport:
replies go out through ``send``, catch-up frames through the sink's
``push``.  A handler that must wait (a database lookup on the cluster bus)
returns a Deferred; the socket handles no further frame until it fires, so
replies keep the order of the frames they answer.
"""

from __future__ import annotations

from typing import Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..stats import Stats
from . import wire
from .hub import Hub, Sink

log = Logger()


class Catchup(Protocol):
    """Latest events to replay right after a subscribe reply."""

    def for_execution(self, user_id: str, graph_exec_id: str, key: str) -> list[wire.OutFrame]: ...

    def for_graph(self, user_id: str, graph_id: str, key: str) -> list[wire.OutFrame]: ...


class SubscriptionGate(Protocol):
    """What a bus that subscribes per channel (the sharded cluster bus)
    checks before a subscribe is answered, as the AutoGPT server does."""

    def execution(self, user_id: str, graph_exec_id: str) -> Deferred[bool]:
        """True when the execution exists and is the user's; fails when that
        cannot be told in time (the database is down)."""

    def graph_refusal(self, user_id: str, graph_id: str) -> str | None:
        """The error text refusing a graph subscription, or None."""

    def settle(self, key: str) -> Deferred[list[wire.OutFrame]]:
        """Hold ``key`` on the bus until it is in effect there; fires with
        the frames to replay after the reply."""

    def release(self, key: str) -> None:
        """Let go of what :meth:`settle` held (the socket holds the key now,
        or gave up)."""


class Session:
    def __init__(self, sink: Sink, hub: Hub, stats: Stats, send: Callable[[bytes], None],
                 max_subscriptions: int = 0, catchup: Catchup | None = None,
                 gate: Callable[[], SubscriptionGate | None] = lambda: None,
                 not_found_reply: bool = True) -> None:
        self.sink = sink
        self.hub = hub
        self.stats = stats
        self.send = send
        self.max_subscriptions = max_subscriptions
        self.catchup = catchup
        self.gate = gate
        self.not_found_reply = not_found_reply

    def handle(self, payload: bytes) -> Deferred[None] | None:
        try:
            request = wire.parse(payload)
        except wire.FrameError as exc:
            self.stats.frames_in["invalid"] += 1
            self.send(wire.error(exc.message))
            return None
        method = request.method
        self.stats.frames_in[method] += 1
        if method == wire.HEARTBEAT:
            self.send(wire.HEARTBEAT_REPLY)
        elif method == wire.ERROR:
            log.info("client reported an error: {error} (user {user_id})",
                     error=str(request.data)[:200], user_id=self.sink.user_id)
        elif method in wire.SERVER_METHODS:
            self.send(wire.error(wire.ERR_NOT_PROCESSED))
        else:
            try:
                field, ident = wire.subscription_target(request)
            except wire.FrameError as exc:
                self.send(wire.error(exc.message))
                return None
            if method == wire.UNSUBSCRIBE:
                self._unsubscribe(field, ident)
            else:
                return self._subscribe(method, ident)
        return None

    # -- subscriptions ------------------------------------------------------

    def _subscribe(self, method: str, ident: str) -> Deferred[None] | None:
        user_id = self.sink.user_id
        key = wire.exec_key(user_id, ident) if method == wire.SUBSCRIBE_EXEC else wire.graph_key(user_id, ident)
        limit = self.max_subscriptions
        if limit and key not in self.sink.keys and len(self.sink.keys) >= limit:
            self.send(wire.error(wire.ERR_SUBSCRIPTION_LIMIT))
            return None
        gate = self.gate()  # the bus's, asked each time: an auto bus learns its kind after start
        if gate is None:  # every event reaches this server: in effect at once
            self._subscribed(method, key, self._cached(method, ident, key))
            return None
        if method == wire.SUBSCRIBE_EXEC:
            d = gate.execution(user_id, ident)
            d.addCallbacks(self._resolved, self._lookup_failed, callbackArgs=(gate, method, ident, key),
                           errbackArgs=(ident,))
            return d
        refusal = gate.graph_refusal(user_id, ident)
        if refusal is not None:
            self.send(wire.error(refusal))
            return None
        return self._settle(gate, method, key)

    def _resolved(self, found: bool, gate: SubscriptionGate, method: str, ident: str,
                  key: str) -> Deferred[None] | None:
        if not self.hub.attached(self.sink):
            return None  # the socket closed during the lookup
        if found:
            return self._settle(gate, method, key)
        if self.not_found_reply:
            self.send(wire.error(wire.err_execution_not_found(ident, self.sink.user_id)))
        return None  # else: no reply (the setting's silent variant)

    def _settle(self, gate: SubscriptionGate, method: str, key: str) -> Deferred[None]:
        """The sharded bus: reply once the key's channel is in effect on its
        shard, with the replay known (from this server, or the store)."""

        def settled(frames: list[wire.OutFrame] | Failure) -> None:
            try:
                if isinstance(frames, Failure):  # a bug: answer all the same, without a replay
                    log.failure("settling {key} failed", frames, key=key)
                    frames = []
                if self.hub.attached(self.sink):  # else the socket closed meanwhile: nothing to leak
                    self._subscribed(method, key, frames)
            finally:
                gate.release(key)

        return gate.settle(key).addBoth(settled)

    def _lookup_failed(self, failure: Failure, ident: str) -> None:
        """The database is down or slow: an error reply, never silence."""
        self.stats.handler_errors += 1
        log.warn("execution lookup for user {user_id} failed: {error}", user_id=self.sink.user_id,
                 error=failure.getErrorMessage() or failure.type.__name__)
        if self.hub.attached(self.sink):
            self.send(wire.error(wire.err_lookup_failed(ident, self.sink.user_id)))

    def _cached(self, method: str, ident: str, key: str) -> list[wire.OutFrame]:
        catchup = self.catchup
        if catchup is None:
            return []
        user_id = self.sink.user_id
        if method == wire.SUBSCRIBE_EXEC:
            return catchup.for_execution(user_id, ident, key)
        return catchup.for_graph(user_id, ident, key)

    def _subscribed(self, method: str, key: str, frames: list[wire.OutFrame]) -> None:
        """Join the hub, reply, and replay, in one call: nothing live can
        come between them."""
        self.hub.subscribe(self.sink, key)
        self.send(wire.subscribed(method, key))
        for frame in frames:
            self.sink.push(frame)
        self.hub.frames_out += len(frames)

    def _unsubscribe(self, field: str, ident: str) -> None:
        user_id = self.sink.user_id
        key = wire.exec_key(user_id, ident) if field == "graph_exec_id" else wire.graph_key(user_id, ident)
        had = self.hub.unsubscribe(self.sink, key)
        self.send(wire.subscribed(wire.UNSUBSCRIBE, key if had else None))
