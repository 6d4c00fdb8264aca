"""The sharded Redis Cluster bus against a real 3-master cluster and a real
PostgreSQL database (AgentGraphExecution), over real WebSocket sockets.

The cluster is started once for the module (trial has no setUpClass) and
killed at exit; each test uses its own ids, so tests do not see each other's
channels.  The database is created once (autogpt_ws_test_<random>) and
dropped at exit.  Producers publish with SPUBLISH exactly as AutoGPT's
executors do: ``publish_event(..., sharded=True)`` through a cluster-aware
publisher that follows MOVED like redis-py's cluster client.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hiredis
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredLock, gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, TestCase

from zope.interface.verify import verifyObject

from autogpt_ws import publish, wire
from autogpt_ws.bus import IEventBus
from autogpt_ws.bus.channels import Layout
from autogpt_ws.bus.executions import APPLICATION_NAME, ExecutionResolver
from autogpt_ws.bus.resp import RedisError, RedisProtocol, connect, encode
from autogpt_ws.bus.shard import closed
from autogpt_ws.bus.slots import key_slot
from autogpt_ws.service import WebsocketServer
from tests.helpers import SECRET, U, Client, RedisServer, free_port, sleep, start_server, token, wait_for
from tests.helpers import connect as ws_connect

LAYOUT = Layout()
NAME = "autogpt-ws-cluster"  # CLIENT SETNAME of the bus's subscriber connections
CLUSTER_ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-require-full-coverage", "no")
ADMIN_URL = os.environ.get("AUTOGPT_WS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def call(port: int, *args: str | bytes | int) -> Any:
    """One command on a fresh blocking connection (test setup and checks)."""
    reader = hiredis.Reader()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(encode(args))
        while True:
            reply = reader.gets()
            if reply is not False:
                return reply
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"redis on {port} closed the connection")
            reader.feed(chunk)


# -- the cluster ----------------------------------------------------------------


class Cluster:
    """3 masters, each with ``replicas`` replicas."""

    def __init__(self, replicas: int = 0, node_timeout: int = 5000) -> None:
        if shutil.which("redis-cli") is None:
            raise SkipTest("redis-cli is not installed")
        self.replicas = replicas
        # the cluster bus port defaults to port + 10000, which may not exist
        # or be free: pick it too
        self.nodes = [RedisServer(extra=(*CLUSTER_ARGS, "--cluster-node-timeout", str(node_timeout),
                                         "--cluster-port", str(free_port())))
                      for _ in range(3 * (1 + replicas))]

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        self.wait_ok()

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every node says cluster_state:ok, they agree on the owners, and
        every master has its replicas in sync."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                views = [sorted((e[0], e[1], e[2][1], len(e) - 3) for e in call(p, "CLUSTER", "SLOTS"))
                         for p in self.ports]
                states = [b"cluster_state:ok" in call(p, "CLUSTER", "INFO") for p in self.ports]
                replication = [call(p, "INFO", "replication") for p in self.ports]
                synced = all(b"role:master" in r or b"master_link_status:up" in r for r in replication)
                if (all(states) and synced and all(v == views[0] for v in views) and len({e[2] for e in views[0]}) == 3
                        and sum(e[1] - e[0] + 1 for e in views[0]) == 16384
                        and all(e[3] == self.replicas for e in views[0])):
                    return
            except (OSError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the test cluster did not become ok")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def alive(self) -> int:
        return next(n.port for n in self.nodes if n.process is not None)

    def keyslot(self, channel: str) -> int:
        return int(call(self.alive(), "CLUSTER", "KEYSLOT", channel))

    def owner(self, channel: str) -> int:
        """Port of the master the cluster says owns ``channel``."""
        slot = self.keyslot(channel)
        for entry in call(self.alive(), "CLUSTER", "SLOTS"):
            if entry[0] <= slot <= entry[1]:
                return int(entry[2][1])
        raise AssertionError(f"no owner for slot {slot}")

    def replica_of(self, port: int) -> int:
        master_id = call(port, "CLUSTER", "MYID").decode()
        line = call(port, "CLUSTER", "REPLICAS", master_id)[0].decode()
        return int(line.split()[1].split("@")[0].rpartition(":")[2])

    def shard_channels(self, port: int) -> set[str]:
        return {c.decode() for c in call(port, "PUBSUB", "SHARDCHANNELS")}

    def clients(self, port: int, pubsub_only: bool = False) -> int:
        """Connections named like the bus's subscribers on that node."""
        args = ("CLIENT", "LIST", "TYPE", "pubsub") if pubsub_only else ("CLIENT", "LIST")
        lines = call(port, *args).decode().splitlines()
        return sum(1 for line in lines if f" name={NAME} " in f" {line} ")

    def migrate(self, slot: int, target: int) -> None:
        """Move one (empty) slot to ``target``, as `redis-cli --cluster
        reshard` does for each slot: IMPORTING, MIGRATING, then NODE."""
        source = next(p for p in self.ports if any(e[0] <= slot <= e[1] and e[2][1] == p
                                                   for e in call(p, "CLUSTER", "SLOTS")))
        ids = {p: call(p, "CLUSTER", "MYID").decode() for p in self.ports}
        call(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        for port in (target, source, *(p for p in self.ports if p not in (source, target))):
            call(port, "CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        self.wait_ok()


_shared: dict[str, Any] = {}


def shared(name: str, make: Any) -> Any:
    """A module-wide fixture, built on first use and torn down at exit; a
    failure (or skip) to build it is remembered and raised again."""
    if name not in _shared:
        try:
            _shared[name] = make()
        except BaseException as exc:
            _shared[name] = exc
    value = _shared[name]
    if isinstance(value, BaseException):
        raise value
    return value


def make_cluster(replicas: int = 0, node_timeout: int = 5000) -> Cluster:
    cluster = Cluster(replicas, node_timeout)
    atexit.register(cluster.stop)
    cluster.start()
    return cluster


# -- the database -----------------------------------------------------------------


class Database:
    """A database of our own holding AutoGPT's AgentGraphExecution table."""

    def __init__(self) -> None:
        import psycopg

        self.psycopg = psycopg
        try:
            admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
        except psycopg.OperationalError as exc:
            raise SkipTest(f"PostgreSQL is not reachable at {urlsplit(ADMIN_URL).hostname}: {exc}") from None
        self.name = "autogpt_ws_test_" + uuid.uuid4().hex[:12]
        with admin:
            admin.execute(f'CREATE DATABASE "{self.name}"')
        parts = urlsplit(ADMIN_URL)
        self.url = urlunsplit(parts._replace(path="/" + self.name))
        self.conn = psycopg.connect(self.url, autocommit=True)
        for schema in ("public", "platform"):
            self.conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            self.conn.execute(f'CREATE TABLE "{schema}"."AgentGraphExecution" '
                              '("id" text PRIMARY KEY, "agentGraphId" text NOT NULL, "userId" text NOT NULL)')

    def add(self, exec_id: str, graph_id: str, user_id: str, schema: str = "public") -> None:
        self.conn.execute(f'INSERT INTO "{schema}"."AgentGraphExecution" ("id", "agentGraphId", "userId") '
                          'VALUES (%s, %s, %s)', (exec_id, graph_id, user_id))

    def delete(self, exec_id: str) -> None:
        self.conn.execute('DELETE FROM "AgentGraphExecution" WHERE "id" = %s', (exec_id,))

    def our_connections(self) -> int:
        row = self.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                                (self.name, APPLICATION_NAME)).fetchone()
        return int(row[0]) if row else 0

    def drop(self) -> None:
        self.conn.close()
        with self.psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def make_database() -> Database:
    database = Database()
    atexit.register(database.drop)
    return database


# -- a producer publishing as AutoGPT's executors do --------------------------------


class ClusterPublisher:
    """SPUBLISH like a Redis Cluster client (redis-py's ``spublish``): to the
    master its slot map (CLUSTER SLOTS) names, following MOVED; a dead node
    or :meth:`refresh` drops the routes.  (A stale route after a manual
    failover would still "work": Redis 7.0 serves SPUBLISH on a replica for
    its master's slots, to the replica's own subscribers only.)"""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.route: dict[str, tuple[str, int]] = {}
        self.conns: dict[tuple[str, int], RedisProtocol] = {}
        self.opened: list[RedisProtocol] = []
        self.lock = DeferredLock()

    @inlineCallbacks
    def _conn(self, address: tuple[str, int]) -> Any:
        conn = self.conns.get(address)
        if conn is None or not conn.connected:
            conn = yield connect(reactor, address[0], address[1], timeout=2)
            self.conns[address] = conn
            self.opened.append(conn)
        return conn

    def publish(self, channel: str, data: bytes) -> Deferred[int]:
        """One at a time, in order."""
        return self.lock.run(self._publish, channel, data)

    @inlineCallbacks
    def _publish(self, channel: str, data: bytes) -> Any:
        for _ in range(10):
            address = self.route.get(channel)
            if address is None:
                address = self.route[channel] = ("127.0.0.1", self.cluster.owner(channel))
            try:
                conn = yield self._conn(address)
                receivers = yield conn.command("SPUBLISH", channel, data)
                return receivers
            except RedisError as exc:
                kind, _, rest = str(exc).partition(" ")
                if kind == "MOVED":
                    host, _, port = rest.split()[1].rpartition(":")
                    self.route[channel] = (host, int(port))
                elif kind in ("CLUSTERDOWN", "TRYAGAIN"):
                    yield sleep(0.2)
                else:
                    raise
            except Exception:
                self.route.pop(channel, None)
        raise AssertionError(f"could not publish to {channel}")

    def refresh(self) -> None:
        self.route.clear()

    def close(self) -> Deferred[Any]:
        waits = []
        for conn in self.opened:
            waits.append(closed(conn))
            if conn.connected and conn.transport is not None:
                conn.transport.loseConnection()
        return gatherResults(waits)


def frame(client: Client, index: int) -> Deferred[dict[str, Any]]:
    return client.message(index, timeout=10).addCallback(json.loads)


class ClusterTestCase(TestCase):
    timeout = 60
    replicas = 0
    node_timeout = 5000

    def setUp(self) -> None:
        self.cluster: Cluster = shared(f"cluster-{self.replicas}",
                                       lambda: make_cluster(self.replicas, self.node_timeout))
        self.cluster.wait_ok()
        self.publisher = ClusterPublisher(self.cluster)
        self.addCleanup(self.publisher.close)

    def database(self) -> Database:
        return shared("database", make_database)

    @inlineCallbacks
    def serve(self, database: Database | None = None, ping: tuple[float, float] | None = None,
              **overrides: Any) -> Any:
        values: dict[str, Any] = {"event_bus": "redis-cluster", "redis_cluster_host": "127.0.0.1",
                                  "redis_cluster_port": self.cluster.ports[0],
                                  "database_url": database.url if database else ""}
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
            self.assertEqual(len(call(port, "CLIENT", "LIST", "TYPE", "pubsub").splitlines()), 1, port)

    @inlineCallbacks
    def test_refcounted_unsubscribe(self) -> None:
        db = self.database()
        server = yield self.serve(db, enable_auth=True, jwt_verify_key=SECRET)
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
        counts = call(owner, "PUBSUB", "SHARDNUMSUB", *sorted(channels))
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
        server = yield self.serve(db)
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
    def test_not_found_reply_when_configured(self) -> None:
        db = self.database()
        theirs = uid("e")
        db.add(theirs, uid("g"), "someone-else")
        server = yield self.serve(db, execution_not_found_reply=True)
        client = yield self.client(server)
        for execution in (theirs, uid("unknown")):
            reply = yield client.request(json.dumps({"method": "subscribe_graph_execution",
                                                     "data": {"graph_exec_id": execution}}))
            self.assertEqual(reply, b'{"method":"error","data":null,"success":false,"channel":null,"error":"Execution not found"}')


class ResolverTests(TestCase):
    """The resolver alone: real PostgreSQL, real thread pool, a Clock for TTLs."""

    def setUp(self) -> None:
        self.db: Database = shared("database", make_database)
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
        masters = {int(e[2][1]) for e in call(owner, "CLUSTER", "SLOTS")}
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
        call(new, "CLUSTER", "FAILOVER")
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
