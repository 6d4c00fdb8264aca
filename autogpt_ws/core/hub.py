"""Who is subscribed to what, and delivery of ready frames to sockets.

The hub knows sockets only as :class:`Sink`: something with a user id, the
set of keys it holds, and ``push(frame)``.  It never sees Autobahn, JSON or
the event bus.  A key exists in the hub exactly while it has a subscriber,
and a user exactly while they have a socket, so nothing empty is left behind.
Buses that subscribe per channel (the sharded cluster bus) watch keys and
users come and go through :class:`HubWatcher`.

Keyed history (when enabled: permessage-deflate with ``deflate_history``):
a frame pushed to a key is handed the :class:`~wire.Link` the key's
previous frame left (``prior``).  Whether a frame leaves one is the
sockets' business (a frame written compressed leaves the end of its
payload, :mod:`deflate`); the hub keeps the link of each key's last frame,
and forgets it when the key goes, when the key's next frame leaves none,
and when no frame came on the key for ``HISTORY_IDLE`` seconds
(:meth:`Hub.sweep`, every ``HISTORY_SWEEP``).
"""

from __future__ import annotations

from typing import Iterable, Protocol

from .wire import NO_STREAM, Link, OutFrame

# Keyed history: the service calls Hub.sweep every HISTORY_SWEEP seconds,
# which forgets the history of keys with no frame for HISTORY_IDLE seconds
# (held at least that long after a key's last frame, at most one sweep more).
HISTORY_SWEEP = 30.0
HISTORY_IDLE = 60.0
_IDLE_SWEEPS = int(HISTORY_IDLE // HISTORY_SWEEP)


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
    def __init__(self, keyed_history: bool = False) -> None:
        self._subscribers: dict[str, set[Sink]] = {}
        self._users: dict[str, set[Sink]] = {}
        self._watchers: list[HubWatcher] = []
        self.frames_out = 0
        # key -> the link of its last frame, while that holds a history
        self._links: dict[str, Link] | None = {} if keyed_history else None
        self._generation = 0  # sweeps so far

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
            if self._links is not None:
                self._forget(key)
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
        """Push ``frame`` to every subscriber of ``key``; returns how many.
        With keyed history, the frame is linked to the key's previous one
        first (once: a frame already linked keeps its place)."""
        sinks = self._subscribers.get(key)
        if not sinks:
            return 0
        targets = tuple(sinks)  # a push may close a socket; never iterate the live set
        links = self._links
        if links is not None:
            prior = frame.prior
            if prior is NO_STREAM:  # else already pushed to a key: it keeps its place
                prior = frame.prior = links.get(key)
        for sink in targets:
            sink.push(frame)
        if links is not None:
            link = frame.link
            if link is not None:  # written compressed: the key's next frame may refer back to it
                if key in self._subscribers:  # else the last socket went during the pushes
                    link.generation = self._generation
                    links[key] = link
            elif prior is not None:  # nobody can refer back to this frame, nor to the one before
                self._forget(key)
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

    # -- keyed history ------------------------------------------------------

    def history(self, key: str) -> bytes | None:
        """What the hub holds for ``key``'s next frame to refer back to."""
        link = self._links.get(key) if self._links is not None else None
        return link.history if link is not None else None

    def history_bytes(self) -> int:
        """Bytes of history held, every key together."""
        return sum(len(link.history or b"") for link in (self._links or {}).values())

    def sweep(self) -> None:
        """Forget the history of keys that had no frame since the sweep
        ``HISTORY_IDLE / HISTORY_SWEEP`` sweeps ago (called every
        ``HISTORY_SWEEP`` seconds by the service)."""
        links = self._links
        if links is None:
            return
        self._generation += 1
        horizon = self._generation - _IDLE_SWEEPS
        for key in [key for key, link in links.items() if link.generation < horizon]:
            self._forget(key)

    def _forget(self, key: str) -> None:
        link = self._links.pop(key, None)  # type: ignore[union-attr]
        if link is not None:
            link.history = None  # a socket's window may still name the link: free what it holds

    def stats(self) -> dict[str, int]:
        return {
            "keys": len(self._subscribers),
            "users": len(self._users),
            "subscriptions": sum(len(s) for s in self._subscribers.values()),
        }
