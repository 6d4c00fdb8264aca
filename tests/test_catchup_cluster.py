"""Catch-up on the sharded cluster bus (issue 13), with real parts: a
3-master Redis Cluster, AutoGPT's database, servers on loopback, browser-like
clients that drop, wait a second and subscribe again, as the frontend does.

- a reconnect landing on the same server, on another server sharing the
  cluster, and on a new server after a rolling restart gets the latest graph
  event published while it was away, right after its subscribe reply;
- the store in the cluster: TTLs, bounds, what is (not) written, the Redis
  traffic counted, a store that refuses (ACL) costs live delivery nothing;
- the reply waits for the shard's confirmation of the SSUBSCRIBE;
- ordering against live events, isolation between users;
- ClusterCatchup's merge rule alone (which of the store and this server's
  cache is newer).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from autogpt_ws.bus.replay import ClusterCatchup
from autogpt_ws.bus.store import latest_key, runs_key
from autogpt_ws.core import wire
from autogpt_ws.core.catchup import LatestEvents
from autogpt_ws.core.channels import Layout
from autogpt_ws.producing import publish
from autogpt_ws.running.service import WebsocketServer
from autogpt_ws.stats import Stats
from tests.helpers import SECRET, Client, SilentServer, U, make_settings, redis_call, sleep, wait_for
from tests.test_bus_cluster import ClusterTestCase, uid

LAYOUT = Layout()
RECONNECT = 1.0  # the AutoGPT frontend comes back 1 s after any close


def event_bytes(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


@inlineCallbacks
def settled(client: Client) -> Any:
    """Every frame sent to ``client`` before now has arrived: a heartbeat
    is answered after the frames before it (a subscribe's reply and replay
    included); its pong is taken out of ``messages``."""
    pong = wire.HEARTBEAT_REPLY
    seen = client.messages.count(pong)
    client.send('{"method":"heartbeat","data":"ping","success":true}')
    yield wait_for(lambda: client.messages.count(pong) > seen, timeout=10)
    client.messages.reverse()
    client.messages.remove(pong)
    client.messages.reverse()


class Reconnects(ClusterTestCase):
    """Where the browser lands after its socket dropped."""

    timeout = 90

    @inlineCallbacks
    def run_then_drop(self, server: WebsocketServer, user: str = U) -> Any:
        """A run the browser watches, then its socket drops: returns (graph,
        execution) and the event published while it was away."""
        db = self.database()
        graph, execution = uid("g"), uid("e")
        db.add(execution, graph, user)
        client = yield self.client(server, user if user != U else None)
        yield self.subscribe(server, client, "graph_exec_id", execution)
        yield self.run_event(user, graph, execution, "RUNNING")
        yield client.message(1, timeout=10)
        yield client.disconnect()
        final = publish.graph_event(user, graph, execution, "COMPLETED", outputs={"answer": ["42"]})
        yield publish.publish_event(self.publisher, LAYOUT, final, sharded=True)
        yield sleep(RECONNECT)
        return graph, execution, final

    @inlineCallbacks
    def resubscribe(self, server: WebsocketServer, field: str, ident: str, user: str = U) -> Any:
        """What a fresh socket gets for its subscribe: the reply, then the
        replayed frames (up to the next pong)."""
        client = yield self.client(server, user if user != U else None)
        method = wire.SUBSCRIBE_EXEC if field == "graph_exec_id" else wire.SUBSCRIBE_GRAPH
        client.send(json.dumps({"method": method, "data": {field: ident}}))
        yield settled(client)
        return client

    @inlineCallbacks
    def test_same_server(self) -> Any:
        server = yield self.serve(self.database())
        graph, execution, final = yield self.run_then_drop(server)
        client = yield self.resubscribe(server, "graph_exec_id", execution)
        key = wire.exec_key(U, execution)
        self.assertEqual(client.messages, [wire.subscribed(wire.SUBSCRIBE_EXEC, key),
                                           wire.push(wire.GRAPH_EVENT, key, event_bytes(final))])
        self.assertEqual(server.stats.catchup_store_reads, 1, "the store is read once per confirmation, "
                                                              "not on a reconnect to a channel kept here")

    @inlineCallbacks
    def test_another_server(self) -> Any:
        database = self.database()
        first = yield self.serve(database)
        second = yield self.serve(database)
        graph, execution, final = yield self.run_then_drop(first)
        client = yield self.resubscribe(second, "graph_exec_id", execution)
        key = wire.exec_key(U, execution)
        self.assertEqual(client.messages, [wire.subscribed(wire.SUBSCRIBE_EXEC, key),
                                           wire.push(wire.GRAPH_EVENT, key, event_bytes(final))])
        # the graph-wide subscribe gets the same bounded replay as on the classic bus
        client = yield self.resubscribe(second, "graph_id", graph)
        gkey = wire.graph_key(U, graph)
        self.assertEqual(client.messages, [wire.subscribed(wire.SUBSCRIBE_GRAPH, gkey),
                                           wire.push(wire.GRAPH_EVENT, gkey, event_bytes(final))])

    @inlineCallbacks
    def test_rolling_restart(self) -> Any:
        """The old server stops gracefully while the new one is up: it
        closes its sockets 1001 and keeps recording until the new server
        holds the channels, so the event published in between is replayed."""
        database = self.database()
        old = yield self.serve(database, catchup_handover=10.0, shutdown_timeout=15.0)
        new = yield self.serve(database)
        graph, execution = uid("g"), uid("e")
        database.add(execution, graph, U)
        client = yield self.client(old)
        yield self.subscribe(old, client, "graph_exec_id", execution)
        stopping = old.stopService()
        code, _ = yield client.closed
        self.assertEqual(code, 1001)
        final = publish.graph_event(U, graph, execution, "COMPLETED")
        counts = yield publish.publish_event(self.publisher, LAYOUT, final, sharded=True)
        self.assertEqual(counts[0], 1, "the stopping server still holds the channel")
        yield sleep(RECONNECT)
        self.assertFalse(stopping.called, "the old server waits for the new one to take over")
        replayed = yield self.resubscribe(new, "graph_exec_id", execution)
        key = wire.exec_key(U, execution)
        self.assertEqual(replayed.messages[1:], [wire.push(wire.GRAPH_EVENT, key, event_bytes(final))])
        yield wait_for(lambda: stopping.called, timeout=5)

    @inlineCallbacks
    def test_a_shard_that_never_answers_does_not_hold_the_stop(self) -> Any:
        """The hand-over asks each channel's master who else holds it; a
        master that accepts and never answers (a loopback listener stands
        in for it here) costs the stop no more than its budget: the stop
        completes within shutdown_timeout, the hand-over given up."""
        from twisted.internet import reactor

        from autogpt_ws.bus.redis_client import RedisAddress, RedisPublisher

        database = self.database()
        server = yield self.serve(database, catchup_handover=60.0, shutdown_timeout=1.5)
        graph, execution = uid("g"), uid("e")
        database.add(execution, graph, U)
        client = yield self.client(server)
        yield self.subscribe(server, client, "graph_exec_id", execution)
        self.assertTrue(server.bus.recording())
        silent = SilentServer(self)
        stand_in = RedisPublisher(RedisAddress(host="127.0.0.1", port=silent.port), reactor, name="autogpt-ws-store")
        self.addCleanup(stand_in.close)
        self.patch(server.bus.store, "node", lambda address: stand_in)
        stopping = server.stopService()
        code, _ = yield client.closed
        self.assertEqual(code, 1001)
        yield wait_for(lambda: stopping.called, timeout=server.settings.shutdown_timeout + 3)
        self.assertTrue(silent.accepted, "the hand-over asked the silent master")
        self.assertFalse(server.running)

    @inlineCallbacks
    def test_restart_with_nobody_up_in_between(self) -> Any:
        """A server that stopped and a new one started later: what was
        recorded before the stop is still replayed (the store outlives the
        process); what was published while no server held the channel is
        lost, as with any pub/sub consumer."""
        database = self.database()
        old = yield self.serve(database, catchup_handover=0)
        graph, execution = uid("g"), uid("e")
        database.add(execution, graph, U)
        client = yield self.client(old)
        yield self.subscribe(old, client, "graph_exec_id", execution)
        running = publish.graph_event(U, graph, execution, "RUNNING")
        yield publish.publish_event(self.publisher, LAYOUT, running, sharded=True)
        yield client.message(1, timeout=10)
        yield old.stopService()
        new = yield self.serve(database)
        replayed = yield self.resubscribe(new, "graph_exec_id", execution)
        key = wire.exec_key(U, execution)
        self.assertEqual(replayed.messages[1:], [wire.push(wire.GRAPH_EVENT, key, event_bytes(running))])

    @inlineCallbacks
    def test_cold_start_replays_nothing(self) -> Any:
        database = self.database()
        server = yield self.serve(database)
        graph, execution = uid("g"), uid("e")
        database.add(execution, graph, U)
        client = yield self.resubscribe(server, "graph_exec_id", execution)
        self.assertEqual(client.messages, [wire.subscribed(wire.SUBSCRIBE_EXEC, wire.exec_key(U, execution))])
        self.assertEqual((server.stats.catchup_misses, server.stats.catchup_store_reads), (1, 1))

    @inlineCallbacks
    def test_users_never_see_each_others_runs(self) -> Any:
        database = self.database()
        server = yield self.serve(database, enable_auth=True, jwt_verify_key=SECRET, auth_failure="close")
        other = yield self.serve(database, enable_auth=True, jwt_verify_key=SECRET, auth_failure="close")
        alice, bob = uid("alice"), uid("bob")
        graph, execution, final = yield self.run_then_drop(server, alice)
        # bob, on the same graph id, on both servers: nothing of alice's
        for where in (server, other):
            client = yield self.resubscribe(where, "graph_id", graph, bob)
            self.assertEqual(client.messages, [wire.subscribed(wire.SUBSCRIBE_GRAPH, wire.graph_key(bob, graph))])
            client = yield self.resubscribe(where, "graph_exec_id", execution, bob)
            self.assertEqual(client.messages, [wire.error(wire.err_execution_not_found(execution, bob))])
        client = yield self.resubscribe(other, "graph_id", graph, alice)
        self.assertEqual(client.messages[1:], [wire.push(wire.GRAPH_EVENT, wire.graph_key(alice, graph),
                                                         event_bytes(final))])

    @inlineCallbacks
    def test_never_older_than_a_live_event(self) -> Any:
        """A run updates without pause while sockets on another server
        subscribe to it: on each socket, after the reply, the updates only
        go forward (a replayed one is never older than one seen live)."""
        database = self.database()
        recorder = yield self.serve(database)
        server = yield self.serve(database)
        graph, execution = uid("g"), uid("e")
        database.add(execution, graph, U)
        watcher = yield self.client(recorder)
        yield self.subscribe(recorder, watcher, "graph_exec_id", execution)
        sequence = {"n": 0, "go": True}

        @inlineCallbacks
        def produce() -> Any:
            while sequence["go"]:
                sequence["n"] += 1
                event = publish.graph_event(U, graph, execution, "RUNNING", stats={"seq": sequence["n"]})
                yield publish.publish_event(self.publisher, LAYOUT, event, sharded=True)

        producing = produce()
        clients: list[Client] = []
        for _ in range(12):
            yield sleep(0.05)
            client = yield self.client(server)
            client.send(json.dumps({"method": wire.SUBSCRIBE_EXEC, "data": {"graph_exec_id": execution}}))
            clients.append(client)
        yield sleep(0.3)
        sequence["go"] = False
        yield producing
        for client in clients:
            yield settled(client)
            self.assertEqual(json.loads(client.messages[0])["method"], wire.SUBSCRIBE_EXEC)
            seqs = [json.loads(m)["data"]["stats"]["seq"] for m in client.messages[1:]]
            self.assertTrue(seqs, "a replay or live events follow the reply")
            self.assertEqual(seqs, sorted(seqs), seqs)
            self.assertEqual(len(seqs), len(set(seqs)), seqs)
            self.assertEqual(seqs[-1], sequence["n"])


class Store(ClusterTestCase):
    """What the store holds, for how long, at what cost."""

    timeout = 60

    @inlineCallbacks
    def test_keys_ttl_and_traffic(self) -> Any:
        database = self.database()
        server = yield self.serve(database, catchup_max_age=120, catchup_graph_limit=2)
        graph = uid("g")
        runs = [uid("e") for _ in range(3)]
        for run in runs:
            database.add(run, graph, U)
        client = yield self.client(server)
        yield self.subscribe(server, client, "graph_id", graph)
        for index, run in enumerate(runs):
            yield self.run_event(U, graph, run, "RUNNING")
            yield client.message(1 + index, timeout=10)
            yield sleep(0.01)  # each run its own write time (the index orders by it)
        for status in ("QUEUED", "RUNNING", "COMPLETED"):  # node events are never written
            node = publish.node_event(U, graph, runs[0], uid("ne"), status)
            yield publish.publish_event(self.publisher, LAYOUT, node, sharded=True)
        yield settled(client)
        self.assertEqual(server.stats.catchup_store_writes, 3)
        self.assertEqual(server.stats.catchup_store_commands, 3 + server.stats.catchup_store_reads)  # a write is one EVAL
        owner = self.cluster.owner(LAYOUT.sharded_all(U, graph))
        for run in runs:
            ttl = redis_call(owner, "TTL", latest_key(U, graph, run))
            self.assertTrue(110 <= ttl <= 120, ttl)
        # the index keeps the graph_limit newest runs
        self.assertEqual(redis_call(owner, "ZRANGE", runs_key(U, graph), 0, -1), [r.encode() for r in runs[1:]])
        self.assertTrue(0 < redis_call(owner, "TTL", runs_key(U, graph)) <= 120)

    @inlineCallbacks
    def test_expired(self) -> Any:
        database = self.database()
        first = yield self.serve(database, catchup_max_age=1)
        second = yield self.serve(database, catchup_max_age=1)
        graph, execution = uid("g"), uid("e")
        database.add(execution, graph, U)
        client = yield self.client(first)
        yield self.subscribe(first, client, "graph_exec_id", execution)
        yield self.run_event(U, graph, execution, "COMPLETED")
        yield client.message(1, timeout=10)
        yield sleep(2.2)
        fresh = yield self.client(second)
        yield self.subscribe(second, fresh, "graph_exec_id", execution)
        yield settled(fresh)
        self.assertEqual(len(fresh.messages), 1, "nothing older than catchup_max_age is replayed")
        self.assertEqual(redis_call(self.cluster.owner(LAYOUT.sharded_all(U, graph)), "EXISTS",
                                    latest_key(U, graph, execution)), 0)

    @inlineCallbacks
    def test_refused_store_costs_live_delivery_nothing(self) -> Any:
        """An ACL user that may subscribe but not read or write keys: every
        store write and read fails and is counted; events are delivered as
        ever, and a subscribe falls back on what this server holds."""
        password = "store-refused"
        for port in self.cluster.ports:
            redis_call(port, "ACL", "SETUSER", "nostore", "on", f">{password}", "allchannels", "allkeys",
                       "+@all", "-@read", "-@write")
            self.addCleanup(redis_call, port, "ACL", "DELUSER", "nostore")
        database = self.database()
        server = yield self.serve(database, redis_username="nostore", redis_password=password)
        graph, execution = uid("g"), uid("e")
        database.add(execution, graph, U)
        client = yield self.client(server)
        reply = yield self.subscribe(server, client, "graph_exec_id", execution)
        self.assertTrue(reply["success"])
        event = publish.graph_event(U, graph, execution, "RUNNING")
        counts = yield publish.publish_event(self.publisher, LAYOUT, event, sharded=True)
        self.assertEqual(counts[0], 1)
        pushed = yield client.message(1, timeout=10)
        self.assertEqual(pushed, wire.push(wire.GRAPH_EVENT, wire.exec_key(U, execution), event_bytes(event)))
        yield wait_for(lambda: server.stats.catchup_store_errors >= 2, timeout=10)  # the read, the write
        again = yield self.client(server)
        yield self.subscribe(server, again, "graph_exec_id", execution)
        yield settled(again)
        self.assertEqual(again.messages[1:], [pushed], "this server's own record is replayed")
        self.assertTrue(server.ready()[0])


class Subscribing(ClusterTestCase):
    timeout = 60

    @inlineCallbacks
    def test_reply_waits_for_the_shard(self) -> Any:
        """While the shard has not confirmed the SSUBSCRIBE, no reply; once
        it has, the reply, and an event published the moment the client has
        it is delivered."""
        database = self.database()
        server = yield self.serve(database)
        graph, execution = uid("g"), uid("e")
        database.add(execution, graph, U)
        client = yield self.client(server)
        channel = LAYOUT.sharded_exec(U, graph, execution)
        link = server.bus.links[server.bus.slots.owner_of(channel)]
        link.conn.transport.pauseProducing()  # the node's answers wait in the kernel
        client.send(json.dumps({"method": wire.SUBSCRIBE_EXEC, "data": {"graph_exec_id": execution}}))
        yield sleep(0.5)
        self.assertEqual(client.messages, [])
        link.conn.transport.resumeProducing()
        reply = yield client.message(0, timeout=10)
        self.assertEqual(reply, wire.subscribed(wire.SUBSCRIBE_EXEC, wire.exec_key(U, execution)))
        counts = yield self.run_event(U, graph, execution, "RUNNING")
        self.assertEqual(counts[0], 1)

    @inlineCallbacks
    def test_channels_linger_then_go(self) -> Any:
        database = self.database()
        server = yield self.serve(database, catchup_linger=0.5)
        graph, execution = uid("g"), uid("e")
        database.add(execution, graph, U)
        channel = LAYOUT.sharded_exec(U, graph, execution)
        owner = self.cluster.owner(channel)
        client = yield self.client(server)
        yield self.subscribe(server, client, "graph_exec_id", execution)
        yield client.disconnect()
        yield sleep(0.2)
        self.assertIn(channel, self.cluster.shard_channels(owner), "kept while its browser reconnects")
        yield wait_for(lambda: channel not in self.cluster.shard_channels(owner), timeout=5)


class StubStore:
    """Store answers the test hands over (the merge rule alone)."""

    def __init__(self) -> None:
        self.reads: list[Deferred[Any]] = []
        self.written: list[tuple[str, ...]] = []

    def read_execution(self, user_id: str, graph_id: str, graph_exec_id: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.reads.append(d)
        return d

    def write(self, *args: Any) -> None:
        self.written.append(args)


class MergeRule(TestCase):
    """The store's event is taken unless this server recorded the
    execution after the channel was confirmed (that one came live)."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.clock.advance(1000)
        stats = Stats()
        self.local = LatestEvents(make_settings(), self.clock, stats)
        self.store = StubStore()
        self.catchup = ClusterCatchup(self.local, self.store, LAYOUT, stats)  # type: ignore[arg-type]
        self.channel = LAYOUT.sharded_exec("u", "g", "e")
        self.key = wire.exec_key("u", "e")

    def event(self, status: str, seq: int, made: dict[tuple[str, int], bytes] = {}) -> bytes:
        if (status, seq) not in made:  # the same bytes each time (its times are now's)
            made[status, seq] = event_bytes(publish.graph_event("u", "g", "e", status, stats={"seq": seq}))
        return made[status, seq]

    def replayed(self, d: Deferred[list[wire.OutFrame]]) -> list[bytes]:
        got: list[Any] = []
        d.addCallback(got.append)
        return [frame.payload for frame in got[0]]

    def test_live_since_the_confirmation_wins(self) -> None:
        self.catchup.live(self.channel, self.clock.seconds())
        d = self.catchup.replay(self.channel, self.key)
        self.clock.advance(0.01)
        self.catchup.record("u", "g", "e", "RUNNING", self.event("RUNNING", 2))  # live, while the store is read
        self.store.reads[0].callback((self.event("RUNNING", 1), 999.0))
        self.assertEqual(self.replayed(d), [wire.push(wire.GRAPH_EVENT, self.key, self.event("RUNNING", 2))])
        self.assertEqual(self.replayed(self.catchup.replay(self.channel, self.key)),
                         [wire.push(wire.GRAPH_EVENT, self.key, self.event("RUNNING", 2))])
        self.assertEqual(len(self.store.reads), 1, "seeded: the cache answers alone")

    def test_the_store_wins_over_what_this_server_held_before(self) -> None:
        self.catchup.record("u", "g", "e", "RUNNING", self.event("RUNNING", 1))  # before the channel went away
        self.clock.advance(60)
        self.catchup.live(self.channel, self.clock.seconds())
        d = self.catchup.replay(self.channel, self.key)
        self.store.reads[0].callback((self.event("COMPLETED", 2), 1050.0))
        self.assertEqual(self.replayed(d), [wire.push(wire.GRAPH_EVENT, self.key, self.event("COMPLETED", 2))])

    def test_a_lost_channel_is_read_again(self) -> None:
        self.catchup.live(self.channel, self.clock.seconds())
        self.catchup.replay(self.channel, self.key)
        self.store.reads[0].callback(None)
        self.catchup.gone(self.channel)
        self.catchup.live(self.channel, self.clock.seconds())
        self.catchup.replay(self.channel, self.key)
        self.assertEqual(len(self.store.reads), 2)

    def test_news_only_is_written(self) -> None:
        for _ in range(2):  # the same event on the execution's and the graph's channel
            self.catchup.record("u", "g", "e", "RUNNING", self.event("RUNNING", 1))
        self.assertEqual(len(self.store.written), 1)

    def test_unreadable_store_falls_back(self) -> None:
        self.catchup.record("u", "g", "e", "RUNNING", self.event("RUNNING", 1))
        self.catchup.live(self.channel, self.clock.seconds())
        d = self.catchup.replay(self.channel, self.key)
        self.store.reads[0].errback(ConnectionError("down"))
        self.assertEqual(self.replayed(d), [wire.push(wire.GRAPH_EVENT, self.key, self.event("RUNNING", 1))])
        self.assertEqual(self.catchup.stats.catchup_store_errors, 1)
