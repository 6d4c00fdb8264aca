"""The sharded Redis Cluster bus against a real 3-master cluster and a real
PostgreSQL database (AgentGraphExecution), over real WebSocket sockets.

The clusters (3 masters; 3 masters with a replica each) are started once
per process on first use (trial has no setUpClass) and killed at exit; each
test uses its own ids, so tests do not see each other's channels.  The
database is created once (autogpt_ws_test_<random>) and dropped at exit.
Producers publish with SPUBLISH exactly as AutoGPT's executors do:
``publish_event(..., sharded=True)`` through a cluster-aware publisher that
routes by CLUSTER SLOTS and follows MOVED like redis-py's cluster client.
The fixtures live in tests/helpers.py.
"""

from __future__ import annotations

import json
import random
import signal
import string
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from autogpt_ws.bus import IEventBus
from autogpt_ws.bus.executions import ExecutionResolver
from autogpt_ws.bus.slots import key_slot
from autogpt_ws.core import wire
from autogpt_ws.core.channels import Layout
from autogpt_ws.producing import publish
from autogpt_ws.running.service import WebsocketServer
from tests.helpers import (SECRET, AutogptDatabase, Client, ClusterPublisher, RedisCluster, SilentServer, U,
                           connect as ws_connect, free_port, make_cluster, make_database, padded, redis_call,
                           shared_fixture, sleep, start_server, token, wait_for)

LAYOUT = Layout()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def frame(client: Client, index: int) -> Deferred[dict[str, Any]]:
    return client.message(index, timeout=10).addCallback(json.loads)


class ClusterTestCase(TestCase):
    timeout = 60
    replicas = 0
    node_timeout = 5000

    def setUp(self) -> None:
        self.cluster: RedisCluster = shared_fixture(
            f"cluster-{self.replicas}", lambda: make_cluster(self.replicas, self.node_timeout))
        self.cluster.wait_ok()
        self.publisher = ClusterPublisher(self.cluster)
        self.addCleanup(self.publisher.close)

    def database(self) -> AutogptDatabase:
        return shared_fixture("database", make_database)

    @inlineCallbacks
    def serve(self, database: AutogptDatabase | None = None, ping: tuple[float, float] | None = None,
              **overrides: Any) -> Any:
        values: dict[str, Any] = {"event_bus": "redis-cluster", "redis_cluster_host": "127.0.0.1",
                                  "redis_cluster_port": self.cluster.ports[0],
                                  # the setting is required; tests without executions never connect to it
                                  "database_url": database.url if database else "postgresql://unused@127.0.0.1:9/unused"}
        values.update(overrides)
        server = start_server(self, **values)
        if ping is not None:  # links are made once the slot map is read: they take these
            server.bus.ping_interval, server.bus.ping_timeout = ping
        yield wait_for(lambda: server.bus.ready()[0], timeout=10)
        return server

    def client(self, server: WebsocketServer, user: str | None = None) -> Deferred[Client]:
        return ws_connect(server.port, token=token(sub=user) if user else None, test=self)

    @inlineCallbacks
    def subscribe(self, server: WebsocketServer, client: Client, field: str, ident: str) -> Any:
        """Subscribe and wait until the bus's channels are confirmed."""
        method = wire.SUBSCRIBE_EXEC if field == "graph_exec_id" else wire.SUBSCRIBE_GRAPH
        reply = yield client.request(json.dumps({"method": method, "data": {field: ident}}))
        yield wait_for(lambda: server.bus.ready()[0], timeout=10)
        return json.loads(reply)

    @inlineCallbacks
    def barrier(self, client: Client) -> Any:
        """Every frame sent to ``client`` before now has arrived."""
        pong = yield client.request('{"method":"heartbeat","data":"ping","success":true}')
        self.assertEqual(pong, b'{"method":"heartbeat","data":"pong","success":true}')
        client.messages.pop()

    def run_event(self, user: str, graph: str, execution: str, status: str = "RUNNING") -> Deferred[Any]:
        event = publish.graph_event(user, graph, execution, status)
        return publish.publish_event(self.publisher, LAYOUT, event, sharded=True)

    def held_everywhere(self) -> dict[int, set[str]]:
        return {port: self.cluster.shard_channels(port) for port in self.cluster.ports}


class RoutingTests(ClusterTestCase):
    def test_keyslot_matches_the_cluster(self) -> None:
        rng = random.Random(7)
        alphabet = string.ascii_letters + string.digits + "{}/|-#é"
        names = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(150)]
        names += [LAYOUT.sharded_all(uid("u"), uid("g")) for _ in range(50)]
        for name in names:
            self.assertEqual(key_slot(name), self.cluster.keyslot(name), name)

    @inlineCallbacks
    def test_execution_graph_and_notification_routing(self) -> None:
        db = self.database()
        graph, execution, other_graph = uid("g"), uid("e"), uid("g")
        db.add(execution, graph, U)
        server = yield self.serve(db)
        one = yield self.client(server)
        two = yield self.client(server)
        reply = yield self.subscribe(server, one, "graph_exec_id", execution)
        self.assertEqual(reply, {"method": "subscribe_graph_execution", "data": None, "success": True,
                                 "channel": f"{U}|graph_exec#{execution}", "error": None})
        reply = yield self.subscribe(server, two, "graph_id", other_graph)
        self.assertEqual(reply["channel"], f"{U}|graph#{other_graph}|executions")
        self.assertEqual(self.cluster.shard_channels(self.cluster.owner(LAYOUT.sharded_exec(U, graph, execution)))
                         & {LAYOUT.sharded_exec(U, graph, execution)}, {LAYOUT.sharded_exec(U, graph, execution)})

        node = publish.node_event(U, graph, execution, "ne-1", "RUNNING")
        counts = yield publish.publish_event(self.publisher, LAYOUT, node, sharded=True)
        self.assertEqual(counts, [1, 0])  # the exec channel is subscribed, the graph's /all is not
        pushed = yield one.message(1, timeout=10)
        self.assertEqual(pushed, b'{"method":"node_execution_event","data":%s,"success":null,"channel":"%s|graph_exec#%s","error":null}'
                         % (json.dumps(node, separators=(",", ":"), ensure_ascii=False).encode(), U.encode(), execution.encode()))

        run = publish.graph_event(U, other_graph, uid("e"), "QUEUED")
        counts = yield publish.publish_event(self.publisher, LAYOUT, run, sharded=True)
        self.assertEqual(counts, [0, 1])
        pushed = yield frame(two, 1)
        self.assertEqual((pushed["method"], pushed["channel"], pushed["data"]),
                         ("graph_execution_event", f"{U}|graph#{other_graph}|executions", run))

        note = publish.notification(U, "AGENT_RUN", "done", extra=1)
        receivers = yield publish.publish_notification(self.publisher, LAYOUT, note)
        self.assertEqual(receivers, 1)
        for client in (one, two):
            pushed = yield frame(client, 2)
            self.assertEqual(pushed, {"method": "notification", "data": note["payload"], "success": None,
                                      "channel": None, "error": None})
            yield self.barrier(client)
            self.assertEqual(len(client.messages), 3)

    @inlineCallbacks
    def test_graph_run_published_with_spublish(self) -> None:
        """A whole run, published to both sharded channels per event as
        AutoGPT's executor does, reaches the execution's and the graph's
        subscribers complete and in order; each channel has one receiver
        (this server's connection) however many sockets want it."""
        db = self.database()
        graph, execution = uid("g"), uid("e")
        db.add(execution, graph, U)
        server = yield self.serve(db)
        watchers = []
        for _ in range(2):
            client = yield self.client(server)
            yield self.subscribe(server, client, "graph_exec_id", execution)
            watchers.append(client)
        dashboard = yield self.client(server)
        yield self.subscribe(server, dashboard, "graph_id", graph)
        events = [publish.graph_event(U, graph, execution, "QUEUED"), publish.graph_event(U, graph, execution, "RUNNING")]
        for node_exec, status in (("n1", "QUEUED"), ("n1", "RUNNING"), ("n1", "COMPLETED"), ("n2", "RUNNING"), ("n2", "COMPLETED")):
            events.append(publish.node_event(U, graph, execution, node_exec, status, output_data={"out": [node_exec]}))
        events.append(publish.graph_event(U, graph, execution, "COMPLETED", outputs={"result": ["ok"]}))
        for event in events:
            counts = yield publish.publish_event(self.publisher, LAYOUT, event, sharded=True)
            self.assertEqual(counts, [1, 1])
        methods = ["graph_execution_event"] * 2 + ["node_execution_event"] * 5 + ["graph_execution_event"]
        for client, key in [(c, f"{U}|graph_exec#{execution}") for c in watchers] + [(dashboard, f"{U}|graph#{graph}|executions")]:
            got = []
            for index in range(len(events)):
                got.append((yield frame(client, 1 + index)))
            self.assertEqual([g["method"] for g in got], methods)
            self.assertEqual([g["data"] for g in got], events)
            self.assertEqual({g["channel"] for g in got}, {key})
            yield self.barrier(client)
            self.assertEqual(len(client.messages), 1 + len(events))


    @inlineCallbacks
    def test_max_message_size_limit_applied(self) -> None:
        """Each sharded channel's message is held to max_message_size_limit:
        at it delivered, one byte over dropped and counted."""
        graph, over_exec, at_exec = uid("g"), uid("e"), uid("e")
        server = yield self.serve(max_message_size_limit=2048)
        client = yield self.client(server)
        yield self.subscribe(server, client, "graph_id", graph)
        over = padded(publish.graph_event(U, graph, over_exec, "RUNNING"), 2049)
        at_limit = padded(publish.graph_event(U, graph, at_exec, "RUNNING"), 2048)
        for event in (over, at_limit):
            yield publish.publish_event(self.publisher, LAYOUT, event, sharded=True)
        got = yield frame(client, 1)
        self.assertEqual(got["data"], at_limit)
        yield self.barrier(client)
        self.assertEqual(len(client.messages), 2)
        self.assertEqual(server.stats.events_dropped["oversized"], 1)


class ConnectionTests(ClusterTestCase):
    @inlineCallbacks
    def test_not_ready_without_a_reachable_seed(self) -> None:
        seeds = (free_port(), free_port())
        server = start_server(self, event_bus="redis-cluster", redis_cluster_host="127.0.0.1",
                              redis_cluster_port=seeds[0], redis_cluster_nodes=(f"127.0.0.1:{seeds[1]}",),
                              redis_password="redis-secret", database_url="postgresql://u:db-secret@db:5432/x")
        verifyObject(IEventBus, server.bus)
        self.assertEqual(server.bus.kind, "redis-cluster")
        description = server.bus.describe()
        self.assertIn(f"127.0.0.1:{seeds[1]}", description)
        self.assertNotIn("secret", description)
        yield wait_for(lambda: "refused" in server.bus.ready()[1], timeout=10)
        ready, reason = server.bus.ready()
        self.assertFalse(ready)
        self.assertTrue(reason.startswith("no cluster slot map: "), reason)

    @inlineCallbacks
    def test_one_connection_per_shard_node(self) -> None:
        db = self.database()
        server = yield self.serve(db, enable_auth=True, jwt_verify_key=SECRET)
        expected: set[str] = set()
        for _ in range(4):
            user = uid("user")
            expected.add(LAYOUT.notification(user))
            for _ in range(2):
                client = yield self.client(server, user)
                for _ in range(6):
                    graph = uid("g")
                    yield self.subscribe(server, client, "graph_id", graph)
                    expected.add(LAYOUT.sharded_all(user, graph))
                graph, execution = uid("g"), uid("e")
                db.add(execution, graph, user)
                yield self.subscribe(server, client, "graph_exec_id", execution)
                expected.add(LAYOUT.sharded_exec(user, graph, execution))
        by_owner = {port: {c for c in expected if self.cluster.owner(c) == port} for port in self.cluster.ports}
        self.assertTrue(all(by_owner.values()), "every node should own some of the channels")
        yield wait_for(lambda: self.held_everywhere() == by_owner, timeout=10)
        for port in self.cluster.ports:
            self.assertEqual(self.cluster.clients(port), 1, port)
            self.assertEqual(self.cluster.clients(port, pubsub_only=True), 1, port)
            self.assertEqual(len(redis_call(port, "CLIENT", "LIST", "TYPE", "pubsub").splitlines()), 1, port)

    @inlineCallbacks
    def test_refcounted_unsubscribe(self) -> None:
        db = self.database()
        server = yield self.serve(db, enable_auth=True, jwt_verify_key=SECRET, catchup_linger=0)
        user, graph, execution = uid("user"), uid("g"), uid("e")
        db.add(execution, graph, user)
        channels = {LAYOUT.sharded_all(user, graph), LAYOUT.sharded_exec(user, graph, execution)}
        note = LAYOUT.notification(user)
        first = yield self.client(server, user)
        second = yield self.client(server, user)
        for client in (first, second):
            yield self.subscribe(server, client, "graph_id", graph)
            yield self.subscribe(server, client, "graph_exec_id", execution)
        owner = self.cluster.owner(next(iter(channels)))
        self.assertTrue(channels <= self.cluster.shard_channels(owner))
        counts = redis_call(owner, "PUBSUB", "SHARDNUMSUB", *sorted(channels))
        self.assertEqual(counts[1::2], [1, 1])  # one subscriber (our connection) for two sockets

        reply = yield first.request(json.dumps({"method": "unsubscribe", "data": {"graph_id": graph}}))
        self.assertEqual(json.loads(reply)["channel"], f"{user}|graph#{graph}|executions")
        reply = yield first.request(json.dumps({"method": "unsubscribe", "data": {"graph_exec_id": execution}}))
        self.assertEqual(json.loads(reply)["channel"], f"{user}|graph_exec#{execution}")
        yield self.barrier(second)
        self.assertTrue(channels <= self.cluster.shard_channels(owner), "one socket still wants them")
        counts = yield self.run_event(user, graph, execution)
        self.assertEqual(counts, [1, 1])
        pushed = yield frame(second, 2)
        self.assertEqual(pushed["channel"], f"{user}|graph_exec#{execution}")
        pushed = yield frame(second, 3)
        self.assertEqual(pushed["channel"], f"{user}|graph#{graph}|executions")
        yield self.barrier(first)
        self.assertEqual(len(first.messages), 4)  # two subscribe and two unsubscribe replies only

        yield second.disconnect()
        yield wait_for(lambda: not channels & self.cluster.shard_channels(owner), timeout=10)
        counts = yield self.run_event(user, graph, execution)
        self.assertEqual(counts, [0, 0])
        self.assertIn(note, self.cluster.shard_channels(self.cluster.owner(note)), "the user still has a socket")
        yield first.disconnect()
        yield wait_for(lambda: note not in self.cluster.shard_channels(self.cluster.owner(note)), timeout=10)
        for port in self.cluster.ports:  # SUNSUBSCRIBE, not a dropped connection
            self.assertEqual(self.cluster.clients(port), 1, port)


class ExecutionLookupTests(ClusterTestCase):
    @inlineCallbacks
    def test_lookup_scoped_to_the_user_and_cached(self) -> None:
        db = self.database()
        mine, theirs, graph = uid("e"), uid("e"), uid("g")
        db.add(mine, graph, U)
        db.add(theirs, graph, "someone-else")
        server = yield self.serve(db, execution_not_found_reply=False)  # the silent variant
        resolver = server.bus.resolver
        first = yield self.client(server)
        reply = yield self.subscribe(server, first, "graph_exec_id", mine)
        self.assertEqual(reply["channel"], f"{U}|graph_exec#{mine}")
        self.assertEqual(resolver.queries, 1)
        channel = LAYOUT.sharded_exec(U, graph, mine)
        self.assertIn(channel, self.cluster.shard_channels(self.cluster.owner(channel)))

        db.delete(mine)  # the second subscribe must not ask the database again
        second = yield self.client(server)
        reply = yield self.subscribe(server, second, "graph_exec_id", mine)
        self.assertEqual(reply["channel"], f"{U}|graph_exec#{mine}")
        self.assertEqual(resolver.queries, 1)

        for execution in (theirs, uid("unknown")):
            first.send(json.dumps({"method": "subscribe_graph_execution", "data": {"graph_exec_id": execution}}))
            yield self.barrier(first)  # the next reply is the pong: nothing answered the subscribe
            self.assertEqual(len(first.messages), 1)
            self.assertFalse(server.hub.wants(wire.exec_key(U, execution)))
        self.assertEqual(resolver.queries, 3)
        held = set().union(*self.held_everywhere().values())
        self.assertFalse({c for c in held if theirs in c}, "another user's execution is not subscribed")

    @inlineCallbacks
    def test_not_found_is_the_autogpt_servers_error(self) -> None:
        """Another user's run, an unknown one and a deleted one (AutoGPT
        soft-deletes: "isDeleted" = true) get upstream's reply, byte for
        byte; the schema comes from DATABASE_URL's ?schema=, as in AutoGPT's
        deployments (platform)."""
        db = self.database()
        theirs, deleted, mine, graph = uid("e"), uid("e"), uid("e"), uid("g")
        db.add(theirs, graph, "someone-else", schema="platform")
        db.add(deleted, graph, U, schema="platform")
        db.soft_delete(deleted, schema="platform")
        db.add(mine, graph, U, schema="platform")
        db.add(deleted, graph, U)  # public has a live row of that id: the URL's schema must win
        server = yield self.serve(db, database_url=db.url + "?schema=platform&connection_limit=5")
        client = yield self.client(server)
        for execution in (theirs, uid("unknown"), deleted):
            reply = yield client.request(json.dumps({"method": "subscribe_graph_execution",
                                                     "data": {"graph_exec_id": execution}}))
            self.assertEqual(reply, b'{"method":"error","data":null,"success":false,"channel":null,'
                                    b'"error":"graph_exec #%s not found for user #%s"}' % (execution.encode(), U.encode()))
            self.assertFalse(server.hub.wants(wire.exec_key(U, execution)))
        reply = yield self.subscribe(server, client, "graph_exec_id", mine)
        self.assertEqual(reply["channel"], f"{U}|graph_exec#{mine}")

    @inlineCallbacks
    def test_wildcard_graph_is_upstreams_error(self) -> None:
        server = yield self.serve()
        client = yield self.client(server)
        reply = yield client.request(json.dumps({"method": "subscribe_graph_executions", "data": {"graph_id": "g*"}}))
        self.assertEqual(reply, b'{"method":"error","data":null,"success":false,"channel":null,"error":"channel_key '
                                b"'execution_event/{%s/g*}/all' contains a wildcard; sharded pub/sub (SSUBSCRIBE) "
                                b'requires exact channel names."}' % U.encode())
        self.assertEqual(list(server.hub.keys()), [])
        reply = yield self.subscribe(server, client, "graph_id", "g-plain")
        self.assertTrue(reply["success"])

    @inlineCallbacks
    def test_database_down_gets_an_error_reply_in_time(self) -> None:
        """A database that refuses, and one that accepts and never answers:
        the subscribe is answered with an error within the lookup timeout,
        and the socket stays usable."""
        hung = SilentServer(self)
        for url in (f"postgresql://postgres@127.0.0.1:{free_port()}/autogpt",
                    f"postgresql://postgres@127.0.0.1:{hung.port}/autogpt"):
            server = yield self.serve(database_url=url, database_timeout=0.5)
            client = yield self.client(server)
            execution = uid("e")
            started = reactor.seconds()
            reply = yield client.request(json.dumps({"method": "subscribe_graph_execution",
                                                     "data": {"graph_exec_id": execution}}))
            self.assertLess(reactor.seconds() - started, 3.0)
            self.assertEqual(json.loads(reply), {
                "method": "error", "data": None, "success": False, "channel": None,
                "error": f"graph_exec #{execution} could not be looked up for user #{U}; try again later"})
            yield self.barrier(client)
            self.assertEqual(server.stats.handler_errors, 1)


class ResolverTests(TestCase):
    """The resolver alone: real PostgreSQL, real thread pool, a Clock for TTLs."""

    def setUp(self) -> None:
        self.db: AutogptDatabase = shared_fixture("database", make_database)
        self.clock = Clock()

    def resolver(self, url: str | None = None, **kwargs: Any) -> ExecutionResolver:
        resolver = ExecutionResolver(self.db.url if url is None else url, reactor, clock=self.clock, **kwargs)
        resolver.start()
        self.addCleanup(resolver.stop)
        return resolver

    @inlineCallbacks
    def test_found_only_for_its_user(self) -> None:
        execution, graph = uid("e"), uid("g")
        self.db.add(execution, graph, "alice")
        resolver = self.resolver()
        self.assertTrue((yield resolver.resolve("alice", execution)))
        self.assertEqual(resolver.graph_id("alice", execution), graph)
        self.assertFalse((yield resolver.resolve("bob", execution)))
        self.assertIsNone(resolver.graph_id("bob", execution))
        self.assertFalse((yield resolver.resolve("alice", uid("unknown"))))
        self.assertEqual(resolver.queries, 3)

    @inlineCallbacks
    def test_positive_answers_cached_until_ttl(self) -> None:
        execution = uid("e")
        self.db.add(execution, uid("g"), "alice")
        resolver = self.resolver(ttl=60.0)
        self.assertTrue((yield resolver.resolve("alice", execution)))
        self.db.delete(execution)
        self.clock.advance(59)
        self.assertTrue((yield resolver.resolve("alice", execution)))
        self.assertEqual(resolver.queries, 1)
        self.clock.advance(2)
        self.assertFalse((yield resolver.resolve("alice", execution)))
        self.assertEqual(resolver.queries, 2)

    @inlineCallbacks
    def test_not_found_cached_briefly(self) -> None:
        execution = uid("e")
        resolver = self.resolver(negative_ttl=3.0)
        self.assertFalse((yield resolver.resolve("alice", execution)))
        self.db.add(execution, uid("g"), "alice")
        self.assertFalse((yield resolver.resolve("alice", execution)))
        self.assertEqual(resolver.queries, 1)
        self.clock.advance(3.5)
        self.assertTrue((yield resolver.resolve("alice", execution)))
        self.assertEqual(resolver.queries, 2)

    @inlineCallbacks
    def test_cache_is_bounded_lru(self) -> None:
        ids = [uid("e") for _ in range(3)]
        for execution in ids:
            self.db.add(execution, uid("g"), "alice")
        resolver = self.resolver(max_entries=2)
        for execution in (ids[0], ids[1], ids[0], ids[2]):  # ids[1] is then the least recently used
            yield resolver.resolve("alice", execution)
        self.assertEqual(resolver.queries, 3)
        yield resolver.resolve("alice", ids[0])
        self.assertEqual(resolver.queries, 3)
        yield resolver.resolve("alice", ids[1])
        self.assertEqual(resolver.queries, 4)

    @inlineCallbacks
    def test_concurrent_lookups_share_one_query(self) -> None:
        execution = uid("e")
        self.db.add(execution, uid("g"), "alice")
        resolver = self.resolver()
        answers = yield gatherResults([resolver.resolve("alice", execution) for _ in range(5)])
        self.assertEqual(answers, [True] * 5)
        self.assertEqual(resolver.queries, 1)

    @inlineCallbacks
    def test_prisma_url_with_schema(self) -> None:
        """AutoGPT's DATABASE_URL is Prisma's: ?schema=platform&connection_limit=..."""
        execution, graph = uid("e"), uid("g")
        self.db.add(execution, graph, "alice", schema="platform")
        resolver = self.resolver(self.db.url + "?schema=platform&connection_limit=5&connect_timeout=5")
        self.assertTrue((yield resolver.resolve("alice", execution)))
        self.assertEqual(resolver.graph_id("alice", execution), graph)

    @inlineCallbacks
    def test_database_down_fails_and_is_not_cached(self) -> None:
        resolver = self.resolver(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing", connect_timeout=2)
        with self.assertRaises(Exception):
            yield resolver.resolve("alice", "e")
        with self.assertRaises(Exception):
            yield resolver.resolve("alice", "e")
        self.assertEqual(resolver.queries, 2)

    @inlineCallbacks
    def test_stop_closes_its_connections(self) -> None:
        resolver = self.resolver()
        yield gatherResults([resolver.resolve("alice", uid("e")) for _ in range(4)])
        self.assertGreaterEqual(self.db.our_connections(), 1)
        resolver.stop()
        yield wait_for(lambda: self.db.our_connections() == 0, timeout=5)  # backends exit just after


class FaultTests(ClusterTestCase):
    timeout = 90

    @inlineCallbacks
    def test_node_restart_mid_stream(self) -> None:
        server = yield self.serve()
        graph, execution = uid("g"), uid("e")
        channel = LAYOUT.sharded_all(U, graph)
        port = self.cluster.owner(channel)
        client = yield self.client(server)
        yield self.subscribe(server, client, "graph_id", graph)
        yield self.run_event(U, graph, execution, "RUNNING")
        pushed = yield frame(client, 1)
        self.assertEqual(pushed["data"]["status"], "RUNNING")

        node = self.cluster.node(port)
        node.stop()  # SIGKILL
        yield wait_for(lambda: not server.bus.ready()[0], timeout=10)
        self.assertIn(f"127.0.0.1:{port}", server.bus.ready()[1])
        node.start()  # same port, same nodes.conf: the same master again
        yield wait_for(lambda: server.bus.ready()[0], timeout=30)
        self.assertIn(channel, self.cluster.shard_channels(port))
        self.assertEqual(self.cluster.clients(port), 1)
        self.assertGreaterEqual(server.stats.bus_reconnects, 1)
        yield self.run_event(U, graph, execution, "COMPLETED")
        pushed = yield frame(client, 2)
        self.assertEqual(pushed["data"]["status"], "COMPLETED")
        yield self.barrier(client)
        self.assertEqual(len(client.messages), 3)

    @inlineCallbacks
    def test_hung_node_noticed_by_ping(self) -> None:
        """A node that stops answering without closing the connection (here
        SIGSTOP) is noticed by the keepalive PING, reconnected (each attempt
        bounded by the connect timeout) and resubscribed once it answers."""
        server = yield self.serve(ping=(0.3, 0.6), redis_connect_timeout=1.0)
        graph = uid("g")
        channel = LAYOUT.sharded_all(U, graph)
        port = self.cluster.owner(channel)
        process = self.cluster.node(port).process
        assert process is not None
        client = yield self.client(server)
        yield self.subscribe(server, client, "graph_id", graph)
        process.send_signal(signal.SIGSTOP)
        self.addCleanup(process.send_signal, signal.SIGCONT)
        yield wait_for(lambda: not server.bus.ready()[0], timeout=10)
        self.assertIn(f"127.0.0.1:{port}", server.bus.ready()[1])
        yield sleep(1.5)  # some reconnect attempts time out in the handshake
        process.send_signal(signal.SIGCONT)
        yield wait_for(lambda: server.bus.ready()[0], timeout=20)
        yield wait_for(lambda: self.cluster.clients(port) == 1, timeout=10)  # the old connection is gone
        self.assertIn(channel, self.cluster.shard_channels(port))
        counts = yield self.run_event(U, graph, uid("e"))
        self.assertEqual(counts, [0, 1])
        pushed = yield frame(client, 1)
        self.assertEqual(pushed["channel"], f"{U}|graph#{graph}|executions")

    @inlineCallbacks
    def test_slot_migration_server_sunsubscribe(self) -> None:
        """The owner of a subscribed channel's slot changes (what `redis-cli
        --cluster reshard` does): Redis drops the subscription with a pushed
        sunsubscribe and the bus resubscribes on the new owner at once (the
        periodic refresh is 30 s away)."""
        server = yield self.serve()
        graph = uid("g")
        channel = LAYOUT.sharded_all(U, graph)
        source = self.cluster.owner(channel)
        target = next(p for p in self.cluster.ports if p != source)
        client = yield self.client(server)
        yield self.subscribe(server, client, "graph_id", graph)
        self.assertIn(channel, self.cluster.shard_channels(source))
        refreshes = server.bus.refreshes

        self.cluster.migrate(self.cluster.keyslot(channel), target)
        yield wait_for(lambda: channel in self.cluster.shard_channels(target) and server.bus.ready()[0], timeout=10)
        self.assertNotIn(channel, self.cluster.shard_channels(source))
        self.assertGreater(server.bus.refreshes, refreshes)
        for port in self.cluster.ports:
            self.assertEqual(self.cluster.clients(port), 1, port)
        counts = yield self.run_event(U, graph, uid("e"))
        self.assertEqual(counts, [0, 1])
        pushed = yield frame(client, 1)
        self.assertEqual(pushed["channel"], f"{U}|graph#{graph}|executions")
        yield self.barrier(client)
        self.assertEqual(len(client.messages), 2)

    @inlineCallbacks
    def test_moved_reply_to_ssubscribe(self) -> None:
        """The bus's slot map is stale (a slot moved while it held nothing
        there): SSUBSCRIBE on the old owner gets MOVED, and the channel goes
        to the node the error names."""
        server = yield self.serve()
        graph = uid("g")
        channel = LAYOUT.sharded_all(U, graph)
        slot = self.cluster.keyslot(channel)
        source = self.cluster.owner(channel)
        target = next(p for p in self.cluster.ports if p != source)
        self.cluster.migrate(slot, target)
        self.assertEqual(server.bus.slots.owner(slot), ("127.0.0.1", source))  # stale, as intended

        client = yield self.client(server)
        yield self.subscribe(server, client, "graph_id", graph)
        yield wait_for(lambda: channel in self.cluster.shard_channels(target), timeout=10)
        self.assertNotIn(channel, self.cluster.shard_channels(source))
        self.assertEqual(server.bus.slots.owner(slot), ("127.0.0.1", target))
        counts = yield self.run_event(U, graph, uid("e"))
        self.assertEqual(counts, [0, 1])
        pushed = yield frame(client, 1)
        self.assertEqual(pushed["channel"], f"{U}|graph#{graph}|executions")


class FailoverTests(ClusterTestCase):
    """3 masters with a replica each; a short node timeout so that a dead
    master's replica is promoted within seconds."""

    replicas = 1
    node_timeout = 1000
    timeout = 90

    @inlineCallbacks
    def subscribed_graph(self, server: WebsocketServer) -> Any:
        graph = uid("g")
        client = yield self.client(server)
        yield self.subscribe(server, client, "graph_id", graph)
        channel = LAYOUT.sharded_all(U, graph)
        old = self.cluster.owner(channel)
        self.assertIn(channel, self.cluster.shard_channels(old))
        return client, graph, channel, old, self.cluster.replica_of(old)

    @inlineCallbacks
    def delivered_once(self, client: Client, graph: str, index: int) -> Any:
        counts = yield self.run_event(U, graph, uid("e"))
        self.assertEqual(counts, [0, 1])
        pushed = yield frame(client, index)
        self.assertEqual(pushed["channel"], f"{U}|graph#{graph}|executions")
        yield self.barrier(client)
        self.assertEqual(len(client.messages), index + 1)

    def held_by_masters_only(self, server: WebsocketServer, channel: str, owner: int) -> None:
        masters = {int(e[2][1]) for e in redis_call(owner, "CLUSTER", "SLOTS")}
        self.assertEqual({a[1] for a in server.bus.links}, masters)
        for port in self.cluster.ports:
            self.assertEqual(self.cluster.clients(port), 1 if port in masters else 0, port)
            self.assertEqual(channel in self.cluster.shard_channels(port), port == owner, port)

    @inlineCallbacks
    def test_manual_failover(self) -> None:
        """CLUSTER FAILOVER: the old master pushes sunsubscribe as it becomes
        a replica; the channel moves to the promoted replica and the old
        master's link is closed."""
        server = yield self.serve()
        client, graph, channel, old, new = yield self.subscribed_graph(server)
        yield self.delivered_once(client, graph, 1)
        redis_call(new, "CLUSTER", "FAILOVER")
        yield wait_for(lambda: self.cluster.owner(channel) == new and server.bus.ready()[0]
                       and channel in self.cluster.shard_channels(new), timeout=20)
        yield wait_for(lambda: self.cluster.clients(old) == 0, timeout=10)
        self.held_by_masters_only(server, channel, new)
        self.publisher.refresh()
        yield self.delivered_once(client, graph, 2)
        self.cluster.wait_ok()

    @inlineCallbacks
    def test_master_killed_replica_promoted(self) -> None:
        server = yield self.serve()
        client, graph, channel, old, new = yield self.subscribed_graph(server)
        node = self.cluster.node(old)
        node.stop()  # SIGKILL; its replica takes over after the node timeout
        self.addCleanup(lambda: node.process is None and node.start())
        yield wait_for(lambda: not server.bus.ready()[0], timeout=10)
        yield wait_for(lambda: server.bus.ready()[0] and channel in self.cluster.shard_channels(new), timeout=30)
        self.assertEqual(self.cluster.owner(channel), new)
        self.assertNotIn(("127.0.0.1", old), server.bus.links)
        yield self.delivered_once(client, graph, 1)
        node.start()  # back as a replica of the new master
        self.cluster.wait_ok()
        self.held_by_masters_only(server, channel, new)


class OurClusterPublisher(ClusterTestCase):
    """autogpt_ws.bus.cluster_publish: what the demo executor and
    ``autogpt-ws publish --sharded`` publish with on a cluster."""

    def ours(self) -> Any:
        from autogpt_ws.bus.cluster_publish import ClusterPublisher as Ours
        from autogpt_ws.bus.redis_client import RedisAddress

        publisher = Ours(RedisAddress("127.0.0.1", self.cluster.ports[0]), reactor)
        self.addCleanup(publisher.close)
        return publisher

    @inlineCallbacks
    def test_each_channel_reaches_its_slots_owner_once(self) -> Any:
        from autogpt_ws.bus.resp import RedisProtocol, connect

        owners: dict[int, str] = {}  # one channel on each master
        while len(owners) < 3:
            channel = LAYOUT.sharded_all(uid("u"), uid("g"))
            owners.setdefault(self.cluster.owner(channel), channel)
        received: list[tuple[bytes, bytes]] = []
        for port, channel in owners.items():
            sub = yield connect(reactor, "127.0.0.1", port, protocol=RedisProtocol(
                on_message=lambda channel, data: received.append((channel, data))))
            gone = sub.lost.addErrback(lambda _: None)  # a clean close ends down the errback path
            self.addCleanup(lambda sub=sub, gone=gone: (sub.transport.loseConnection(), gone)[1])
            yield sub.subscribe("SSUBSCRIBE", [channel])
        publisher = self.ours()
        for round in (1, 2):
            for port, channel in owners.items():
                receivers = yield publisher.publish(channel, b"round %d" % round)
                self.assertEqual(receivers, 1, (port, channel))
            # the seed owns one of the three: the other two were MOVED, once
            self.assertEqual(publisher.redirects, 2)
        yield wait_for(lambda: len(received) == 6)
        self.assertEqual(sorted(received), sorted((c.encode(), b"round %d" % r) for r in (1, 2) for c in owners.values()))

    @inlineCallbacks
    def test_demo_executor_on_the_cluster_bus(self) -> Any:
        from autogpt_ws.running.tap import build
        from tests.helpers import make_settings

        settings = make_settings(event_bus="redis-cluster", redis_cluster_host="127.0.0.1",
                                 redis_cluster_port=self.cluster.ports[0],
                                 database_url="postgresql://unused@127.0.0.1:9/unused")
        server = build(settings, demo=True, reactor=reactor)
        server.privilegedStartService()
        server.startService()
        self.addCleanup(lambda: server.stopService() if server.running else None)
        yield wait_for(lambda: server.bus.ready()[0], timeout=10)
        client = yield self.client(server)
        yield self.subscribe(server, client, "graph_id", "demo-graph")
        first = yield frame(client, 1)  # the first run starts 1 s after startup
        self.assertEqual((first["method"], first["data"]["graph_id"]), ("graph_execution_event", "demo-graph"))
