"""The hub as a unit: subscriptions by key, sockets by user, delivery, and
nothing empty left behind (issue 3, point 3); and a session never
subscribing a socket the hub has already forgotten."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase

from autogpt_ws.core import wire
from autogpt_ws.core.hub import Hub
from autogpt_ws.core.session import Session
from autogpt_ws.core.wire import OutFrame
from autogpt_ws.stats import Stats


class FakeSink:
    """A socket as the hub sees it."""

    def __init__(self, user_id: str, hub: Hub | None = None, close_on_push: bool = False) -> None:
        self.user_id = user_id
        self.keys: set[str] = set()
        self.pushed: list[OutFrame] = []
        self._hub = hub
        self._close_on_push = close_on_push

    def push(self, frame: OutFrame) -> None:
        self.pushed.append(frame)
        if self._close_on_push and self._hub is not None:
            self._hub.detach(self)  # a push that closes the socket at once

    def __repr__(self) -> str:
        return f"FakeSink({self.user_id!r})"


class Watcher:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def key_added(self, key: str) -> None:
        self.calls.append(("key_added", key))

    def key_removed(self, key: str) -> None:
        self.calls.append(("key_removed", key))

    def user_added(self, user_id: str) -> None:
        self.calls.append(("user_added", user_id))

    def user_removed(self, user_id: str) -> None:
        self.calls.append(("user_removed", user_id))


def frame(text: str = "x") -> OutFrame:
    return OutFrame(text.encode())


class HubTests(TestCase):
    def setUp(self) -> None:
        self.hub = Hub()

    def assertEmpty(self) -> None:
        self.assertEqual(list(self.hub.keys()), [])
        self.assertEqual(list(self.hub.users()), [])
        self.assertEqual(self.hub.stats(), {"keys": 0, "users": 0, "subscriptions": 0})

    def test_attach_detach(self) -> None:
        a, b = FakeSink("u1"), FakeSink("u1")
        self.assertFalse(self.hub.attached(a))
        self.hub.attach(a)
        self.hub.attach(b)
        self.assertTrue(self.hub.attached(a))
        self.assertEqual(self.hub.user_sockets("u1"), 2)
        self.assertTrue(self.hub.has_user("u1"))
        self.hub.detach(a)
        self.assertFalse(self.hub.attached(a))
        self.assertTrue(self.hub.attached(b))
        self.assertEqual(self.hub.user_sockets("u1"), 1)
        self.hub.detach(b)
        self.assertEqual(self.hub.user_sockets("u1"), 0)
        self.assertFalse(self.hub.has_user("u1"))
        self.assertEmpty()

    def test_subscribe_and_publish(self) -> None:
        a, b, c = FakeSink("u1"), FakeSink("u1"), FakeSink("u2")
        for sink in (a, b, c):
            self.hub.attach(sink)
        self.hub.subscribe(a, "k1")
        self.hub.subscribe(b, "k1")
        self.hub.subscribe(c, "k2")
        self.assertEqual(a.keys, {"k1"})
        self.assertTrue(self.hub.wants("k1"))
        self.assertFalse(self.hub.wants("k3"))
        f = frame()
        self.assertEqual(self.hub.publish("k1", f), 2)
        self.assertEqual((a.pushed, b.pushed, c.pushed), ([f], [f], []))
        self.assertEqual(self.hub.publish("nobody", frame()), 0)
        self.assertEqual(self.hub.frames_out, 2)
        self.assertEqual(self.hub.stats(), {"keys": 2, "users": 2, "subscriptions": 3})

    def test_subscribe_twice_is_one_subscription(self) -> None:
        a = FakeSink("u1")
        self.hub.attach(a)
        self.hub.subscribe(a, "k")
        self.hub.subscribe(a, "k")
        self.assertEqual(self.hub.publish("k", frame()), 1)
        self.assertEqual(len(a.pushed), 1)
        self.assertTrue(self.hub.unsubscribe(a, "k"))
        self.assertFalse(self.hub.wants("k"))
        self.assertEqual(a.keys, set())

    def test_unsubscribe_rule(self) -> None:
        """True when the key had any subscriber on this server before the call,
        even another socket; False when nobody held it."""
        a, b = FakeSink("u1"), FakeSink("u1")
        self.hub.attach(a)
        self.hub.attach(b)
        self.assertFalse(self.hub.unsubscribe(a, "never"))
        self.assertNotIn("never", list(self.hub.keys()))
        self.hub.subscribe(b, "k")
        self.assertTrue(self.hub.unsubscribe(a, "k"))  # b holds it
        self.assertTrue(self.hub.wants("k"))
        self.assertEqual(b.keys, {"k"})
        self.assertTrue(self.hub.unsubscribe(b, "k"))
        self.assertFalse(self.hub.wants("k"))
        self.assertFalse(self.hub.unsubscribe(b, "k"))
        self.assertEqual(list(self.hub.keys()), [])

    def test_detach_cleans_everything_and_is_idempotent(self) -> None:
        a, b = FakeSink("u1"), FakeSink("u2")
        self.hub.attach(a)
        self.hub.attach(b)
        for key in ("k1", "k2", "k3"):
            self.hub.subscribe(a, key)
        self.hub.subscribe(b, "k2")
        self.hub.detach(a)
        self.assertEqual(a.keys, set())
        self.assertEqual(sorted(self.hub.keys()), ["k2"])
        self.assertEqual(list(self.hub.users()), ["u2"])
        self.hub.detach(a)
        self.hub.detach(b)
        self.hub.detach(b)
        self.assertEmpty()

    def test_detach_of_a_never_attached_sink(self) -> None:
        a = FakeSink("u1")
        self.hub.subscribe(a, "k")  # subscribed without attach
        self.hub.detach(a)
        self.assertEmpty()

    def test_notify_every_socket_of_the_user(self) -> None:
        a, b, c = FakeSink("u1"), FakeSink("u1"), FakeSink("u2")
        for sink in (a, b, c):
            self.hub.attach(sink)
        f = frame()
        self.assertEqual(self.hub.notify("u1", f), 2)
        self.assertEqual((a.pushed, b.pushed, c.pushed), ([f], [f], []))
        self.assertEqual(self.hub.notify("nobody", frame()), 0)
        self.assertNotIn("nobody", list(self.hub.users()))

    def test_push_that_detaches_during_delivery(self) -> None:
        a = FakeSink("u1", self.hub, close_on_push=True)
        b = FakeSink("u1", self.hub, close_on_push=True)
        for sink in (a, b):
            self.hub.attach(sink)
            self.hub.subscribe(sink, "k")
        self.assertEqual(self.hub.publish("k", frame()), 2)
        self.assertEqual((len(a.pushed), len(b.pushed)), (1, 1))
        self.assertEmpty()
        c = FakeSink("u1", self.hub, close_on_push=True)
        d = FakeSink("u1", self.hub, close_on_push=True)
        self.hub.attach(c)
        self.hub.attach(d)
        self.assertEqual(self.hub.notify("u1", frame()), 2)
        self.assertEmpty()

    def test_watchers(self) -> None:
        watcher = Watcher()
        self.hub.watch(watcher)
        a, b = FakeSink("u1"), FakeSink("u1")
        self.hub.attach(a)
        self.hub.attach(b)  # same user: no second user_added
        self.hub.subscribe(a, "k")
        self.hub.subscribe(b, "k")  # same key: no second key_added
        self.hub.subscribe(a, "k2")
        self.hub.unsubscribe(a, "k")  # b still holds k
        self.hub.unsubscribe(a, "missing")
        self.hub.detach(a)
        self.hub.detach(b)
        self.assertEqual(watcher.calls, [
            ("user_added", "u1"), ("key_added", "k"), ("key_added", "k2"),
            ("key_removed", "k2"), ("key_removed", "k"), ("user_removed", "u1"),
        ])
        self.hub.unwatch(watcher)
        self.hub.unwatch(watcher)  # twice is harmless
        self.hub.attach(a)
        self.hub.subscribe(a, "k")
        self.assertEqual(len(watcher.calls), 6)


class PendingGate:
    """Execution lookups that answer when the test says."""

    def __init__(self) -> None:
        self.pending: list[Deferred[bool]] = []

    def execution(self, user_id: str, graph_exec_id: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.pending.append(d)
        return d

    def graph_refusal(self, user_id: str, graph_id: str) -> str | None:
        return None

    def settle(self, key: str) -> Deferred[list[Any]]:
        return succeed([])

    def release(self, key: str) -> None:
        pass


class SessionCleanupTests(TestCase):
    """A subscribe waiting on an execution lookup (the sharded bus) must not
    subscribe a socket that closed meanwhile: its key would never go."""

    SUBSCRIBE = b'{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}'

    def setUp(self) -> None:
        self.hub = Hub()
        self.sink = FakeSink("u1")
        self.hub.attach(self.sink)
        self.resolver = PendingGate()
        self.replies: list[bytes] = []
        self.session = Session(self.sink, self.hub, Stats(), self.replies.append, gate=lambda: self.resolver)

    def test_lookup_answered_while_open(self) -> None:
        self.assertIsNotNone(self.session.handle(self.SUBSCRIBE))
        self.assertEqual((self.replies, list(self.hub.keys())), ([], []))
        self.resolver.pending[0].callback(True)
        self.assertEqual(list(self.hub.keys()), ["u1|graph_exec#e1"])
        self.assertEqual(self.replies, [wire.subscribed(wire.SUBSCRIBE_EXEC, "u1|graph_exec#e1")])

    def test_lookup_answered_after_close(self) -> None:
        self.session.handle(self.SUBSCRIBE)
        self.hub.detach(self.sink)  # the socket closed
        self.resolver.pending[0].callback(True)
        self.assertEqual(self.hub.stats(), {"keys": 0, "users": 0, "subscriptions": 0})
        self.assertEqual((self.replies, self.sink.keys), ([], set()))
