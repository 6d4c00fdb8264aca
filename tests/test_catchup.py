"""Catch-up on subscribe (issue 8): the latest graph event per execution.

Three layers:
- LatestEvents alone, with task.Clock: bounds (bytes, age, LRU), updates,
  oversize events, the graph-wide selection, per-user isolation, a flood of
  distinct executions and the memory really held (tracemalloc);
- Router + Hub + Session in one process (no sockets): what is decoded, and
  the order of reply, cached and live frames within one reactor turn;
- a real server on loopback with the memory bus and Autobahn clients.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from autogpt_ws.core import wire
from autogpt_ws.core.catchup import LatestEvents, entry_cost, graph_cost
from autogpt_ws.core.channels import Layout
from autogpt_ws.core.hub import Hub
from autogpt_ws.core.router import Router
from autogpt_ws.core.session import Session
from autogpt_ws.producing import publish
from autogpt_ws.stats import Stats
from autogpt_ws.web.metrics import Metrics
from tests.helpers import SECRET, Client, U, connect, make_settings, start_server, token

LAYOUT = Layout()
PONG = wire.HEARTBEAT_REPLY
HEARTBEAT = b'{"method":"heartbeat","data":"ping","success":true}'
PREFIX = len(b'{"payload":')


def event_bytes(user_id: str, graph_id: str, exec_id: str, status: str, **extra: Any) -> bytes:
    """A graph event exactly as the router hands it to the cache: the
    payload's bytes inside the producer's envelope."""
    return publish.envelope(publish.graph_event(user_id, graph_id, exec_id, status, **extra))[PREFIX:-1]


def frame(key: str, event: bytes) -> bytes:
    """The frame a live graph event gets on channel ``key``."""
    return wire.push(wire.GRAPH_EVENT, key, event)


def payloads(frames: list[wire.OutFrame]) -> list[bytes]:
    return [f.payload for f in frames]


def sub_exec(exec_id: str) -> bytes:
    return json.dumps({"method": "subscribe_graph_execution", "data": {"graph_exec_id": exec_id}}).encode()


def sub_graph(graph_id: str) -> bytes:
    return json.dumps({"method": "subscribe_graph_executions", "data": {"graph_id": graph_id}}).encode()


class Fixture:
    """A LatestEvents on a task.Clock with its own Stats."""

    def __init__(self, **settings: Any) -> None:
        self.clock = Clock()
        self.stats = Stats()
        self.cache = LatestEvents(make_settings(**settings), self.clock, self.stats)

    def record(self, graph_id: str, exec_id: str, status: str, user_id: str = U, **extra: Any) -> bytes:
        event = event_bytes(user_id, graph_id, exec_id, status, **extra)
        self.cache.record(user_id, graph_id, exec_id, status, event)
        return event

    def latest(self, exec_id: str, user_id: str = U) -> list[bytes]:
        return payloads(self.cache.for_execution(user_id, exec_id, wire.exec_key(user_id, exec_id)))

    def graph(self, graph_id: str, user_id: str = U) -> list[bytes]:
        return payloads(self.cache.for_graph(user_id, graph_id, wire.graph_key(user_id, graph_id)))


def accounted(cache: LatestEvents) -> int:
    """The bytes the cache should account, recomputed from what it holds;
    also checks its two indexes agree."""
    entries, graphs = cache._entries, cache._by_graph
    assert sum(len(runs) for runs in graphs.values()) == len(entries)
    for (user_id, exec_id), entry in entries.items():
        assert graphs[entry.graph][exec_id] is entry and entry.graph[0] == user_id
    return (sum(entry_cost(k[1], e.event) for k, e in entries.items())
            + sum(graph_cost(*g) for g in graphs))


# -- LatestEvents, unit ---------------------------------------------------------


class LatestEventsTests(TestCase):
    def test_keeps_latest_event_per_execution(self) -> None:
        f = Fixture()
        f.record("g1", "e1", "RUNNING")
        done = f.record("g1", "e1", "COMPLETED")
        other = f.record("g1", "e2", "QUEUED")
        self.assertEqual(f.latest("e1"), [frame(wire.exec_key(U, "e1"), done)])
        self.assertEqual(f.latest("e2"), [frame(wire.exec_key(U, "e2"), other)])
        self.assertEqual(f.latest("nope"), [])
        self.assertEqual((f.stats.catchup_hits, f.stats.catchup_misses), (2, 1))
        self.assertEqual(len(f.cache), 2)

    def test_update_replaces_bytes_and_position(self) -> None:
        """An update re-accounts the entry (no double counting) and moves
        it to the most recently updated end."""
        f = Fixture()
        f.record("g1", "e1", "RUNNING")
        f.record("g1", "e2", "RUNNING")
        big = f.record("g1", "e1", "COMPLETED", outputs={"out": ["x" * 5000]})
        self.assertEqual(len(f.cache), 2)
        self.assertEqual(f.cache.bytes, accounted(f.cache))
        self.assertEqual(f.cache.bytes, graph_cost(U, "g1") + entry_cost("e1", big)
                         + entry_cost("e2", f.cache._entries[(U, "e2")].event))
        self.assertEqual([k[1] for k in f.cache._entries], ["e2", "e1"])
        f.record("g1", "e1", "COMPLETED")  # smaller again
        self.assertEqual(f.cache.bytes, accounted(f.cache))

    def test_eviction_by_bytes_least_recently_updated_first(self) -> None:
        sample = event_bytes(U, "g1", "e0", "RUNNING")
        budget = graph_cost(U, "g1") + 3 * entry_cost("e0", sample)
        f = Fixture(catchup_max_bytes=budget)
        for exec_id in ("e1", "e2", "e3"):
            f.record("g1", exec_id, "RUNNING")
        self.assertEqual((len(f.cache), f.stats.catchup_evictions), (3, 0))
        f.record("g1", "e1", "RUNNING")  # e1 is now the most recently updated
        f.latest("e2")  # a read does not refresh
        f.record("g1", "e4", "RUNNING")
        self.assertEqual(sorted(k[1] for k in f.cache._entries), ["e1", "e3", "e4"])
        self.assertEqual(f.stats.catchup_evictions, 1)
        f.record("g1", "e5", "RUNNING")
        self.assertEqual(sorted(k[1] for k in f.cache._entries), ["e1", "e4", "e5"])
        self.assertEqual(f.stats.catchup_evictions, 2)
        self.assertLessEqual(f.cache.bytes, budget)
        self.assertEqual(f.cache.bytes, accounted(f.cache))

    def test_eviction_by_age(self) -> None:
        f = Fixture(catchup_max_age=3600)
        f.record("g1", "old", "COMPLETED")
        f.clock.advance(1800)
        f.record("g1", "young", "RUNNING")
        f.clock.advance(1800)  # "old" exactly 3600 s old: still kept
        self.assertEqual(len(f.latest("old")), 1)
        f.clock.advance(1)
        self.assertEqual(f.latest("old"), [])  # a read never returns an expired entry
        self.assertEqual(len(f.latest("young")), 1)
        self.assertEqual(f.stats.catchup_evictions, 1)
        f.clock.advance(1800)
        # nothing recorded or read: the bytes gauge itself lets go
        self.assertEqual(f.cache.bytes, 0)
        self.assertEqual((len(f.cache), f.cache._by_graph), (0, {}))
        self.assertEqual(f.stats.catchup_evictions, 2)

    def test_age_counts_from_the_last_update(self) -> None:
        f = Fixture(catchup_max_age=100)
        f.record("g1", "e1", "RUNNING")
        f.clock.advance(90)
        f.record("g1", "e1", "RUNNING")
        f.clock.advance(90)
        self.assertEqual(len(f.latest("e1")), 1)

    def test_clock_going_backwards_keeps_lru_order(self) -> None:
        f = Fixture(catchup_max_age=100)
        f.clock.advance(1000)
        f.record("g1", "e1", "RUNNING")
        f.clock.rightNow = 500.0  # wall clock stepped back
        f.record("g1", "e2", "RUNNING")
        stamps = [entry.updated_at for entry in f.cache._entries.values()]
        self.assertEqual(stamps, sorted(stamps))
        f.clock.rightNow = 1101.0
        self.assertEqual((f.latest("e1"), f.latest("e2")), ([], []))

    def test_oversize_event_is_not_kept_and_drops_the_stale_state(self) -> None:
        f = Fixture(catchup_max_bytes=20_000)
        f.record("g1", "e1", "RUNNING")
        f.record("g1", "e2", "RUNNING")
        f.record("g1", "e3", "RUNNING", outputs={"o": ["x" * 30_000]})
        self.assertEqual(f.latest("e3"), [])
        self.assertEqual(len(f.cache), 2)  # the rest is untouched
        self.assertEqual(f.stats.catchup_evictions, 0)
        # an oversize update of a cached execution: its older state must not be replayed
        f.record("g1", "e2", "COMPLETED", outputs={"o": ["x" * 30_000]})
        self.assertEqual(f.latest("e2"), [])
        self.assertEqual(f.stats.catchup_evictions, 1)
        self.assertEqual(len(f.graph("g1")), 1)  # the graph index forgot e2 too
        self.assertEqual(f.cache.bytes, accounted(f.cache))

    def test_zero_bytes_holds_nothing(self) -> None:
        f = Fixture(catchup_max_bytes=0)
        f.record("g1", "e1", "COMPLETED")
        self.assertEqual((len(f.cache), f.cache.bytes, f.latest("e1"), f.graph("g1")), (0, 0, [], []))

    def test_cross_user_isolation(self) -> None:
        f = Fixture()
        a = f.record("g1", "e1", "COMPLETED", user_id="user-a")
        b = f.record("g1", "e1", "RUNNING", user_id="user-b")
        self.assertEqual(f.latest("e1", "user-a"), [frame(wire.exec_key("user-a", "e1"), a)])
        self.assertEqual(f.latest("e1", "user-b"), [frame(wire.exec_key("user-b", "e1"), b)])
        self.assertEqual(f.latest("e1", "user-c"), [])
        self.assertEqual(f.graph("g1", "user-a"), [frame(wire.graph_key("user-a", "g1"), a)])
        self.assertEqual(f.graph("g1", "user-c"), [])
        self.assertNotIn(a, b"".join(f.graph("g1", "user-b")))

    def test_graph_wide_selection_and_order(self) -> None:
        """Runs not final, plus runs that reached a final state in the last
        catchup_recent_final seconds, in update order (oldest first)."""
        f = Fixture(catchup_recent_final=300)
        f.record("g1", "ended-long-ago", "COMPLETED")
        f.clock.advance(301)
        running = f.record("g1", "running", "RUNNING")
        f.clock.advance(1)
        f.record("g2", "other-graph", "RUNNING")
        f.record("g1", "other-user", "RUNNING", user_id="someone-else")
        queued = f.record("g1", "queued", "QUEUED")
        failed = f.record("g1", "failed", "FAILED")
        review = f.record("g1", "review", "REVIEW")
        incomplete = f.record("g1", "incomplete", "INCOMPLETE")
        terminated = f.record("g1", "terminated", "TERMINATED")
        key = wire.graph_key(U, "g1")
        self.assertEqual(f.graph("g1"), [frame(key, e) for e in (running, queued, failed, review, incomplete, terminated)])
        f.clock.advance(300)  # "failed" and "terminated" ended exactly 300 s ago: still in
        self.assertEqual(len(f.graph("g1")), 6)
        f.clock.advance(1)
        self.assertEqual(f.graph("g1"), [frame(key, e) for e in (running, queued, review, incomplete)])
        # an update moves a run to the end
        running2 = f.record("g1", "running", "RUNNING", stats={"n": 2})
        self.assertEqual(f.graph("g1"), [frame(key, e) for e in (queued, review, incomplete, running2)])

    def test_graph_wide_final_time_is_when_it_first_ended(self) -> None:
        """A final run re-published in a final state still counts from when
        it ended; the per-execution replay still gives its latest event."""
        f = Fixture(catchup_recent_final=300)
        f.record("g1", "e1", "COMPLETED")
        f.clock.advance(200)
        again = f.record("g1", "e1", "COMPLETED", stats={"cost": 1})
        f.clock.advance(101)
        self.assertEqual(f.graph("g1"), [])
        self.assertEqual(f.latest("e1"), [frame(wire.exec_key(U, "e1"), again)])
        # running again, then ended again: counts from the new end
        f.record("g1", "e1", "RUNNING")
        f.clock.advance(10)
        f.record("g1", "e1", "FAILED")
        f.clock.advance(290)
        self.assertEqual(len(f.graph("g1")), 1)

    def test_graph_wide_limit_keeps_most_recent_oldest_first(self) -> None:
        f = Fixture(catchup_graph_limit=50)
        events = [f.record("g1", f"e{i}", "RUNNING") for i in range(60)]
        key = wire.graph_key(U, "g1")
        self.assertEqual(f.graph("g1"), [frame(key, e) for e in events[10:]])
        first = f.record("g1", "e0", "COMPLETED")
        self.assertEqual(f.graph("g1"), [frame(key, e) for e in events[11:] + [first]])

    def test_graph_limit_zero_replays_nothing(self) -> None:
        f = Fixture(catchup_graph_limit=0)
        f.record("g1", "e1", "RUNNING")
        self.assertEqual(f.graph("g1"), [])
        self.assertEqual((f.stats.catchup_hits, f.stats.catchup_misses), (0, 1))
        self.assertEqual(len(f.latest("e1")), 1)

    def test_graph_wide_counts_hits_and_misses(self) -> None:
        f = Fixture()
        f.record("g1", "e1", "RUNNING")
        f.graph("g1")
        f.graph("g2")
        self.assertEqual((f.stats.catchup_hits, f.stats.catchup_misses), (1, 1))

    def test_metrics(self) -> None:
        f = Fixture(catchup_max_bytes=graph_cost(U, "g1") + entry_cost("e1", event_bytes(U, "g1", "e1", "RUNNING")))
        f.record("g1", "e1", "RUNNING")
        f.record("g1", "e2", "RUNNING")  # evicts e1
        f.latest("e1")
        f.latest("e2")
        text = Metrics(f.stats, lambda: 0, lambda: True, lambda: f.cache.bytes).render().decode()
        self.assertIn("autogpt_ws_catchup_hits_total 1.0", text)
        self.assertIn("autogpt_ws_catchup_misses_total 1.0", text)
        self.assertIn("autogpt_ws_catchup_evictions_total 1.0", text)
        self.assertIn(f"autogpt_ws_catchup_bytes {float(f.cache.bytes)}", text)
        self.assertGreater(f.cache.bytes, 0)


class MemoryBoundTests(TestCase):
    USER = "3e53486c-cf57-477e-ba2a-cb02dc828e1a"
    TEMPLATE = event_bytes("U" * 36, "G" * 36, "E" * 36, "RUNNING")

    def flood(self, cache: LatestEvents, clock: Clock, count: int, graph_per_run: bool,
              small: bool, check: Callable[[], None] | None = None) -> None:
        """``count`` distinct executions; every id a new str, as the channel
        parser makes them."""
        user = self.USER
        template = self.TEMPLATE
        for i in range(count):
            exec_id = "%08x-0000-4000-8000-%012x" % (i, i)
            graph_id = "%08x-1111-4000-8000-%012x" % (i, i) if graph_per_run else "aaaaaaaa-1111-4000-8000-000000000000"
            user_id = user[:18] + user[18:]
            event = (b'{"id":"%s"}' % exec_id.encode() if small else
                     template.replace(b"E" * 36, exec_id.encode()).replace(b"G" * 36, graph_id.encode()))
            cache.record(user_id, graph_id, exec_id, "RUNNING", event)
            clock.advance(0.001)
            if check is not None:
                check()

    def test_flood_of_distinct_executions_stays_within_bytes(self) -> None:
        limit = 1024 * 1024
        f = Fixture(catchup_max_bytes=limit)
        peak = [0]

        def check() -> None:
            held = f.cache._bytes
            if held > limit:
                raise AssertionError(f"{held} bytes held over the {limit} limit")
            peak[0] = max(peak[0], held)

        self.flood(f.cache, f.clock, 100_000, graph_per_run=True, small=False, check=check)
        held = len(f.cache)
        self.assertGreater(peak[0], limit * 0.9)  # the bound was really reached
        self.assertGreater(held, 100)
        self.assertEqual(f.stats.catchup_evictions, 100_000 - held)
        self.assertEqual(f.cache.bytes, accounted(f.cache))
        self.assertEqual(len(f.cache._by_graph), held)  # no empty index left behind
        # the survivors are the most recently updated
        self.assertEqual(len(f.latest("%08x-0000-4000-8000-%012x" % (99_999, 99_999), self.USER)), 1)
        self.assertEqual(f.latest("%08x-0000-4000-8000-%012x" % (0, 0), self.USER), [])

    def measure(self, count: int, graph_per_run: bool, small: bool) -> tuple[int, int]:
        """(memory really allocated and still held by a cache after a
        flood, bytes it accounts), by tracemalloc."""
        settings = make_settings(catchup_max_bytes=1024 * 1024)
        clock, stats = Clock(), Stats()
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            cache = LatestEvents(settings, clock, stats)
            self.flood(cache, clock, count, graph_per_run, small)
            gc.collect()
            real = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        return real, cache._bytes

    def assertHonest(self, real: int, counted: int) -> None:
        ratio = real / counted
        self.assertTrue(0.5 <= ratio <= 1.25, f"{real} bytes really held for {counted} accounted ({ratio:.2f}x)")
        self.assertLessEqual(real, 1.25 * 1024 * 1024)

    def test_memory_really_held_follows_accounting_one_graph_per_run(self) -> None:
        """The worst case for overhead: every execution its own graph."""
        self.assertHonest(*self.measure(5000, graph_per_run=True, small=False))
        self.assertHonest(*self.measure(5000, graph_per_run=True, small=True))

    def test_memory_really_held_follows_accounting_shared_graph(self) -> None:
        self.assertHonest(*self.measure(5000, graph_per_run=False, small=False))
        self.assertHonest(*self.measure(5000, graph_per_run=False, small=True))


# -- Router + Hub + Session, in process ------------------------------------------


class Recorder:
    """A socket as the hub and the session see it; replies and pushes go
    to one list, in the order the socket would write them."""

    def __init__(self, user_id: str, log: list[bytes]) -> None:
        self.user_id = user_id
        self.keys: set[str] = set()
        self.log = log

    def push(self, frame: wire.OutFrame) -> None:
        self.log.append(frame.payload)


class InProcess:
    def __init__(self, catchup: bool = True) -> None:
        self.clock = Clock()
        self.stats = Stats()
        self.hub = Hub()
        self.cache = LatestEvents(make_settings(), self.clock, self.stats) if catchup else None
        self.router = Router(self.hub, self.stats, LAYOUT, graph_events=self.cache)

    def socket(self, user_id: str = U) -> tuple[Session, list[bytes]]:
        log: list[bytes] = []
        sink = Recorder(user_id, log)
        self.hub.attach(sink)
        return Session(sink, self.hub, self.stats, log.append, catchup=self.cache), log

    def publish(self, event: dict[str, Any]) -> bytes:
        """Route an event as the memory / classic bus does; its bytes."""
        data = publish.envelope(event)
        self.router.classic(publish.execution_channels(LAYOUT, event)[0], data)
        return data[PREFIX:-1]


class DecodingTests(TestCase):
    def count_decoding(self) -> dict[str, int]:
        """Count the router's envelope openings and every JSON document
        decoded (json.loads and any JSONDecoder instance go through
        JSONDecoder.decode)."""
        counts = {"open_envelope": 0, "json": 0}
        open_envelope, decode = wire.open_envelope, json.JSONDecoder.decode

        def counting_open(data: bytes) -> Any:
            counts["open_envelope"] += 1
            return open_envelope(data)

        def counting_decode(decoder: json.JSONDecoder, *args: Any, **kwargs: Any) -> Any:
            counts["json"] += 1
            return decode(decoder, *args, **kwargs)

        self.patch(wire, "open_envelope", counting_open)
        self.patch(json.JSONDecoder, "decode", counting_decode)
        return counts

    def test_node_events_for_nobody_are_not_decoded(self) -> None:
        p = InProcess()
        counts = self.count_decoding()
        for i in range(200):
            p.publish(publish.node_event(U, "g1", f"e{i}", f"n{i}", "RUNNING"))
        self.assertEqual(counts, {"open_envelope": 0, "json": 0})
        self.assertEqual((p.stats.events_received, p.stats.events_ignored), (200, 200))
        self.assertEqual(len(p.cache), 0)

    def test_graph_events_are_decoded_once_and_recorded(self) -> None:
        p = InProcess()
        counts = self.count_decoding()
        for i in range(50):
            p.publish(publish.graph_event(U, "g1", f"e{i}", "RUNNING"))
        self.assertEqual(counts["open_envelope"], 50)
        self.assertLessEqual(counts["json"], 50)
        self.assertGreater(counts["json"], 0, "the JSON counter sees no decoding: update count_decoding")
        self.assertEqual(len(p.cache), 50)
        self.assertEqual(p.stats.events_ignored, 0)

    def test_graph_event_with_subscribers_on_both_keys_is_decoded_once(self) -> None:
        p = InProcess()
        session, log = p.socket()
        session.handle(sub_exec("e1"))
        session.handle(sub_graph("g1"))
        del log[:]
        counts = self.count_decoding()
        event = p.publish(publish.graph_event(U, "g1", "e1", "COMPLETED"))
        self.assertEqual(counts["open_envelope"], 1)
        self.assertLessEqual(counts["json"], 1)
        self.assertEqual(log, [frame(wire.exec_key(U, "e1"), event), frame(wire.graph_key(U, "g1"), event)])

    def test_switched_off_graph_events_for_nobody_are_not_decoded(self) -> None:
        p = InProcess(catchup=False)
        counts = self.count_decoding()
        p.publish(publish.graph_event(U, "g1", "e1", "COMPLETED"))
        self.assertEqual(counts, {"open_envelope": 0, "json": 0})
        self.assertEqual(p.stats.events_ignored, 1)


class SameTurnOrderingTests(TestCase):
    """Everything below happens in one reactor turn, in every order the
    reactor could run a bus message and a subscribe frame."""

    def test_event_then_subscribe_then_newer_event(self) -> None:
        p = InProcess()
        session, log = p.socket()
        key = wire.exec_key(U, "e1")
        running = p.publish(publish.graph_event(U, "g1", "e1", "RUNNING"))
        session.handle(sub_exec("e1"))
        done = p.publish(publish.graph_event(U, "g1", "e1", "COMPLETED"))
        self.assertEqual(log, [wire.subscribed(wire.SUBSCRIBE_EXEC, key), frame(key, running), frame(key, done)])

    def test_subscribe_then_event(self) -> None:
        p = InProcess()
        session, log = p.socket()
        key = wire.exec_key(U, "e1")
        session.handle(sub_exec("e1"))
        done = p.publish(publish.graph_event(U, "g1", "e1", "COMPLETED"))
        self.assertEqual(log, [wire.subscribed(wire.SUBSCRIBE_EXEC, key), frame(key, done)])
        self.assertEqual(p.stats.catchup_misses, 1)

    def test_resubscribe_replays_the_newest_not_an_older_one(self) -> None:
        p = InProcess()
        session, log = p.socket()
        key = wire.exec_key(U, "e1")
        p.publish(publish.graph_event(U, "g1", "e1", "RUNNING"))
        session.handle(sub_exec("e1"))
        done = p.publish(publish.graph_event(U, "g1", "e1", "COMPLETED"))
        del log[:]
        session.handle(sub_exec("e1"))
        self.assertEqual(log, [wire.subscribed(wire.SUBSCRIBE_EXEC, key), frame(key, done)])

    def test_cached_frame_is_the_live_frame(self) -> None:
        """Same bytes as the live push of that event on that key."""
        p = InProcess()
        live_session, live = p.socket()
        live_session.handle(sub_exec("e1"))
        live_session.handle(sub_graph("g1"))
        p.publish(publish.graph_event(U, "g1", "e1", "COMPLETED", outputs={"é": ["ü"]}))
        late_session, late = p.socket()
        late_session.handle(sub_exec("e1"))
        late_session.handle(sub_graph("g1"))
        self.assertEqual(late[1], live[2])
        self.assertEqual(late[3], live[3])

    def test_node_events_are_not_replayed(self) -> None:
        p = InProcess()
        p.publish(publish.node_event(U, "g1", "e1", "n1", "COMPLETED"))
        session, log = p.socket()
        session.handle(sub_exec("e1"))
        self.assertEqual(len(log), 1)


# -- a real server, real sockets ----------------------------------------------------


@inlineCallbacks
def until_pong(client: Client, start: int = 0) -> Any:
    """Send a heartbeat; every message from index ``start`` up to its pong.
    The server answers frames in order and pushes catch-up frames right
    after the subscribe reply, so anything it would replay is in here."""
    client.send(HEARTBEAT)
    got: list[bytes] = []
    index = start
    while True:
        message = yield client.message(index)
        index += 1
        if message == PONG:
            return got
        got.append(message)


class EndToEndTests(TestCase):
    @inlineCallbacks
    def test_reconnect_after_final_event_gets_it(self) -> Any:
        """The issue's scenario: the browser's socket is down while the run
        completes; it reconnects, subscribes again, and learns COMPLETED."""
        server = start_server(self)
        key = wire.exec_key(U, "e1")
        first = yield connect(server.port, test=self)
        first.send(sub_exec("e1"))
        running = publish.graph_event(U, "g1", "e1", "RUNNING")
        self.assertEqual((yield until_pong(first)), [wire.subscribed(wire.SUBSCRIBE_EXEC, key)])
        yield publish.publish_event(server.bus, server.layout, running)
        yield first.message(2)
        yield first.disconnect()

        done = publish.graph_event(U, "g1", "e1", "COMPLETED", outputs={"result": ["42"]})
        yield publish.publish_event(server.bus, server.layout, done)
        yield publish.publish_event(server.bus, server.layout, publish.node_event(U, "g1", "e1", "n1", "COMPLETED"))

        again = yield connect(server.port, test=self)
        again.send(sub_exec("e1"))
        got = yield until_pong(again)
        self.assertEqual(got, [wire.subscribed(wire.SUBSCRIBE_EXEC, key),
                               frame(key, publish.envelope(done)[PREFIX:-1])])
        self.assertEqual(json.loads(got[1])["data"]["status"], "COMPLETED")
        self.assertEqual((server.stats.catchup_hits, server.stats.catchup_misses), (1, 1))
        text = server.metrics.render().decode()
        self.assertIn("autogpt_ws_catchup_hits_total 1.0", text)
        self.assertIn(f"autogpt_ws_catchup_bytes {float(server.catchup.bytes)}", text)

    @inlineCallbacks
    def test_cached_then_live_in_order_and_same_as_live(self) -> Any:
        """Publish the final event, subscribe, publish a newer live one: the
        late socket sees reply, cached, live; the cached frame has the bytes
        a socket subscribed all along got live."""
        server = start_server(self)
        key = wire.exec_key(U, "e1")
        watcher = yield connect(server.port, test=self)
        watcher.send(sub_exec("e1"))
        yield until_pong(watcher)
        yield publish.publish_event(server.bus, server.layout, publish.graph_event(U, "g1", "e1", "COMPLETED"))
        live_frame = yield watcher.message(2)

        late = yield connect(server.port, test=self)
        reply = yield late.request(sub_exec("e1"))
        self.assertEqual(reply, wire.subscribed(wire.SUBSCRIBE_EXEC, key))
        newer = publish.graph_event(U, "g1", "e1", "COMPLETED", stats={"cost": 7})
        yield publish.publish_event(server.bus, server.layout, newer)
        got = yield until_pong(late)
        self.assertEqual(got, [reply, live_frame, frame(key, publish.envelope(newer)[PREFIX:-1])])

    @inlineCallbacks
    def test_subscribe_and_publish_in_the_same_reactor_turn(self) -> Any:
        """Events published just before and just after the subscribe frame
        is handled, in the very call that handles it."""
        server = start_server(self)
        key = wire.exec_key(U, "e1")
        before = publish.graph_event(U, "g1", "e1", "RUNNING", stats={"n": 1})
        after = publish.graph_event(U, "g1", "e1", "COMPLETED", stats={"n": 2})
        handle = Session.handle

        def racing(session: Session, payload: bytes) -> Any:
            if b"subscribe_graph_execution" not in payload:
                return handle(session, payload)
            publish.publish_event(server.bus, server.layout, before)
            result = handle(session, payload)
            publish.publish_event(server.bus, server.layout, after)
            return result

        self.patch(Session, "handle", racing)
        client = yield connect(server.port, test=self)
        client.send(sub_exec("e1"))
        got = yield until_pong(client)
        self.assertEqual(got, [wire.subscribed(wire.SUBSCRIBE_EXEC, key),
                               frame(key, publish.envelope(before)[PREFIX:-1]),
                               frame(key, publish.envelope(after)[PREFIX:-1])])

    @inlineCallbacks
    def test_subscribe_during_a_stream_of_updates(self) -> Any:
        """Updates published one per reactor turn while the subscribe frame
        travels: wherever it lands, the socket sees one contiguous,
        increasing run of updates ending with the last."""
        server = start_server(self)
        count = 200
        client = yield connect(server.port, test=self)
        done: Deferred[None] = Deferred()

        def step(i: int) -> None:
            if i == count:
                done.callback(None)
                return
            status = "COMPLETED" if i == count - 1 else "RUNNING"
            publish.publish_event(server.bus, server.layout, publish.graph_event(U, "g1", "e1", status, stats={"n": i}))
            reactor.callLater(0, step, i + 1)

        client.send(sub_exec("e1"))
        reactor.callLater(0, step, 0)
        yield done
        got = yield until_pong(client)
        self.assertEqual(got[0], wire.subscribed(wire.SUBSCRIBE_EXEC, wire.exec_key(U, "e1")))
        seen = [json.loads(m)["data"]["stats"]["n"] for m in got[1:]]
        self.assertTrue(seen, "no update reached the socket")
        self.assertEqual(seen, list(range(seen[0], count)))

    @inlineCallbacks
    def test_graph_wide_catch_up(self) -> Any:
        server = start_server(self, catchup_graph_limit=3)
        events = [
            publish.graph_event(U, "g1", "old", "QUEUED"),
            publish.graph_event(U, "g1", "e1", "RUNNING"),
            publish.graph_event(U, "g2", "x", "RUNNING"),
            publish.graph_event(U, "g1", "e2", "COMPLETED"),
            publish.graph_event(U, "g1", "e3", "REVIEW"),
        ]
        for event in events:
            yield publish.publish_event(server.bus, server.layout, event)
        yield publish.publish_event(server.bus, server.layout, publish.node_event(U, "g1", "e1", "n1", "RUNNING"))
        client = yield connect(server.port, test=self)
        client.send(sub_graph("g1"))
        got = yield until_pong(client)
        key = wire.graph_key(U, "g1")
        self.assertEqual(got, [wire.subscribed(wire.SUBSCRIBE_GRAPH, key)]
                         + [frame(key, publish.envelope(events[i])[PREFIX:-1]) for i in (1, 3, 4)])
        client.send(sub_graph("nothing-here"))
        self.assertEqual(len((yield until_pong(client, len(client.messages)))), 1)

    @inlineCallbacks
    def test_cross_user_isolation_with_auth(self) -> Any:
        server = start_server(self, enable_auth=True, jwt_verify_key=SECRET)
        a_event = publish.graph_event("user-a", "g1", "e1", "COMPLETED")
        yield publish.publish_event(server.bus, server.layout, a_event)
        bob = yield connect(server.port, token=token(sub="user-b"), test=self)
        bob.send(sub_exec("e1"))
        bob.send(sub_graph("g1"))
        self.assertEqual((yield until_pong(bob)), [
            wire.subscribed(wire.SUBSCRIBE_EXEC, wire.exec_key("user-b", "e1")),
            wire.subscribed(wire.SUBSCRIBE_GRAPH, wire.graph_key("user-b", "g1")),
        ])
        alice = yield connect(server.port, token=token(sub="user-a"), test=self)
        alice.send(sub_exec("e1"))
        key = wire.exec_key("user-a", "e1")
        self.assertEqual((yield until_pong(alice)), [wire.subscribed(wire.SUBSCRIBE_EXEC, key),
                                                     frame(key, publish.envelope(a_event)[PREFIX:-1])])
        # an event on another user's channel claiming to be user-a's is not cached for anyone
        forged = publish.graph_event("user-a", "g1", "e9", "COMPLETED")
        yield server.bus.publish(LAYOUT.classic_exec("user-b", "g1", "e9"), publish.envelope(forged))
        bob.send(sub_exec("e9"))
        self.assertEqual(len((yield until_pong(bob, len(bob.messages)))), 1)
        self.assertEqual((server.stats.catchup_hits, server.stats.catchup_misses), (1, 3))

    @inlineCallbacks
    def test_switched_off_holds_and_replays_nothing(self) -> Any:
        server = start_server(self, catchup_enabled=False)
        self.assertIsNone(server.catchup)
        self.assertIsNone(server.router.graph_events)
        for status in ("RUNNING", "COMPLETED"):
            yield publish.publish_event(server.bus, server.layout, publish.graph_event(U, "g1", "e1", status))
        self.assertEqual(server.stats.events_ignored, 2)  # nobody subscribed: not even decoded
        client = yield connect(server.port, test=self)
        client.send(sub_exec("e1"))
        client.send(sub_graph("g1"))
        self.assertEqual((yield until_pong(client)), [
            wire.subscribed(wire.SUBSCRIBE_EXEC, wire.exec_key(U, "e1")),
            wire.subscribed(wire.SUBSCRIBE_GRAPH, wire.graph_key(U, "g1")),
        ])
        self.assertEqual((server.stats.catchup_hits, server.stats.catchup_misses), (0, 0))
        self.assertIn("autogpt_ws_catchup_bytes 0.0", server.metrics.render().decode())
