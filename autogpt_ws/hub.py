"""Who is subscribed to what, and delivery of ready frames to sockets.

The hub knows sockets only as :class:`Sink`: something with a user id, the
set of keys it holds, and ``push(frame)``.  It never sees Autobahn, JSON or
the event bus.  A key exists in the hub exactly while it has a subscriber,
and a user exactly while they have a socket, so nothing empty is left behind.
Buses that subscribe per channel (the sharded cluster bus) watch keys and
users come and go through :class:`HubWatcher`.
"""

from __future__ import annotations

from typing import Iterable, Protocol

from .wire import OutFrame


class Sink(Protocol):
    user_id: str
    keys: set[str]

    def push(self, frame: OutFrame) -> None: ...


class HubWatcher(Protocol):
    def key_added(self, key: str) -> None: ...

    def key_removed(self, key: str) -> None: ...

    def user_added(self, user_id: str) -> None: ...

    def user_removed(self, user_id: str) -> None: ...


class Hub:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[Sink]] = {}
        self._users: dict[str, set[Sink]] = {}
        self._watchers: list[HubWatcher] = []
        self.frames_out = 0

    # -- sockets ------------------------------------------------------------

    def attach(self, sink: Sink) -> None:
        sinks = self._users.get(sink.user_id)
        if sinks is None:
            sinks = self._users[sink.user_id] = set()
            for watcher in self._watchers:
                watcher.user_added(sink.user_id)
        sinks.add(sink)

    def detach(self, sink: Sink) -> None:
        """Forget a socket and everything it held. Safe to call twice."""
        for key in tuple(sink.keys):
            self.unsubscribe(sink, key)
        sinks = self._users.get(sink.user_id)
        if sinks is not None and sink in sinks:
            sinks.discard(sink)
            if not sinks:
                del self._users[sink.user_id]
                for watcher in self._watchers:
                    watcher.user_removed(sink.user_id)

    def attached(self, sink: Sink) -> bool:
        """Whether ``sink`` is attached (its socket open, not yet detached)."""
        return sink in self._users.get(sink.user_id, ())

    def user_sockets(self, user_id: str) -> int:
        return len(self._users.get(user_id, ()))

    # -- subscriptions ------------------------------------------------------

    def subscribe(self, sink: Sink, key: str) -> None:
        sinks = self._subscribers.get(key)
        if sinks is None:
            sinks = self._subscribers[key] = set()
            for watcher in self._watchers:
                watcher.key_added(key)
        sinks.add(sink)
        sink.keys.add(key)

    def unsubscribe(self, sink: Sink, key: str) -> bool:
        """Drop ``sink`` from ``key``. True when the key had any subscriber
        on this server before the call (the rule of the unsubscribe reply)."""
        sink.keys.discard(key)
        sinks = self._subscribers.get(key)
        if sinks is None:
            return False
        sinks.discard(sink)
        if not sinks:
            del self._subscribers[key]
            for watcher in self._watchers:
                watcher.key_removed(key)
        return True

    def wants(self, key: str) -> bool:
        return key in self._subscribers

    def has_user(self, user_id: str) -> bool:
        return user_id in self._users

    def keys(self) -> Iterable[str]:
        return self._subscribers.keys()

    def users(self) -> Iterable[str]:
        return self._users.keys()

    def watch(self, watcher: HubWatcher) -> None:
        self._watchers.append(watcher)

    def unwatch(self, watcher: HubWatcher) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    # -- delivery -----------------------------------------------------------

    def publish(self, key: str, frame: OutFrame) -> int:
        """Push ``frame`` to every subscriber of ``key``; returns how many."""
        sinks = self._subscribers.get(key)
        if not sinks:
            return 0
        targets = tuple(sinks)  # a push may close a socket; never iterate the live set
        for sink in targets:
            sink.push(frame)
        self.frames_out += len(targets)
        return len(targets)

    def notify(self, user_id: str, frame: OutFrame) -> int:
        """Push ``frame`` to every socket of ``user_id``."""
        sinks = self._users.get(user_id)
        if not sinks:
            return 0
        targets = tuple(sinks)
        for sink in targets:
            sink.push(frame)
        self.frames_out += len(targets)
        return len(targets)

    def stats(self) -> dict[str, int]:
        return {
            "keys": len(self._subscribers),
            "users": len(self._users),
            "subscriptions": sum(len(s) for s in self._subscribers.values()),
        }
