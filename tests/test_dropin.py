"""Dropped in for AutoGPT's websocket_server, with nothing but the
environment AutoGPT gives that service (PROTOCOL.md section 8).

- The whole service from its environment alone: a real 3-master Redis
  Cluster with a password whose nodes announce host names (as compose's
  redis-0..2 do), AutoGPT's database in the ``platform`` schema, ES256 tokens
  from a JWKS served over plain http, events published as today's executors
  publish them (SPUBLISH to both channels of an execution).  The server is a
  real process given exactly those variables and none of ours.
- Which bus: with a Redis named and no EVENT_BUS, the server asks the Redis
  (INFO cluster) and runs the cluster or the classic bus; it keeps asking
  while the Redis is unreachable or refuses the password; EVENT_BUS wins.
- Where shards are reached (REDIS_USE_ANNOUNCED_ADDRESS): the seed host with
  the announced port (the default), or the announced addresses or host
  names, on a real cluster whose nodes announce an address of their own.
- A JWKS over plain http on a host that is not local works, with a warning.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from autogpt_ws.config import load
from autogpt_ws.core import wire
from autogpt_ws.core.channels import Layout
from autogpt_ws.producing import publish
from autogpt_ws.running.service import WebsocketServer
from tests.helpers import (ClusterPublisher, RedisServer, U, connect as ws_connect, free_port, http_get, make_cluster,
                           make_database, raw_request, redis_call, redis_server, shared_fixture, sleep, start_server,
                           token, upgrade_request, wait_for)
from tests.test_auth import jwks, keypair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = Layout()
PASSWORD = "autogpt-ws-test-password"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def compose_like(index: int) -> tuple[str, ...]:
    """What compose's redis-0..2 do: announce a host name (here one that
    resolves to the node: localhost) and prefer it as the endpoint."""
    return "--cluster-announce-hostname", "localhost", "--cluster-preferred-endpoint-type", "hostname"


def announcing(index: int) -> tuple[str, ...]:
    """Nodes that announce an address of their own (127.0.0.2, where they
    listen too) and a host name nobody can resolve; which one CLUSTER SLOTS
    names is cluster-preferred-endpoint-type, set per test."""
    return "--cluster-announce-ip", "127.0.0.2", "--cluster-announce-hostname", f"shard-{index}.invalid"


def serve_files(test: TestCase, files: dict[str, bytes]) -> int:
    """Files served over plain http by another process (the server under
    test fetches them while this process's reactor may be busy)."""
    root = tempfile.mkdtemp(prefix="autogpt-ws-files-")
    for path, body in files.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as handle:
            handle.write(body)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", root,
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        proc.kill()
        proc.wait(10)

    test.addCleanup(stop)
    import socket
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return port
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the file server did not start")


def captured_log(test: TestCase) -> list[str]:
    """Every log line (formatted) emitted during the test."""
    from twisted.logger import formatEvent

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


def error_frame(text: str) -> bytes:
    return wire.error(text)


class DeafTLSRedis:
    """A TLS peer on loopback that answers CLIENT SETNAME and ``INFO
    cluster`` as a single Redis does, then never reads again and never
    closes (no close_notify answered) until the test's cleanup."""

    def __init__(self, test: TestCase, directory: str) -> None:
        import socket
        import ssl
        import threading

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(os.path.join(directory, "server.pem"), os.path.join(directory, "server.key"))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.answered = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        test.addCleanup(self.stop)

    def _serve(self) -> None:
        info = b"# Cluster\r\ncluster_enabled:0\r\n"
        try:
            conn, _ = self.listener.accept()
            with self.context.wrap_socket(conn, server_side=True) as tls:
                data = b""
                for marker, reply in ((b"SETNAME", b"+OK\r\n"), (b"INFO", b"$%d\r\n%s\r\n" % (len(info), info))):
                    while marker not in data:
                        chunk = tls.recv(4096)
                        if not chunk:
                            return
                        data += chunk
                    tls.sendall(reply)
                self.answered.set()
                self.done.wait(120)
        except OSError:
            return

    def stop(self) -> None:
        import socket

        self.done.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting
        except OSError:
            pass
        self.listener.close()
        self.thread.join(10)


class AutogptEnvironment(TestCase):
    """The server as a process given AutoGPT's websocket_server environment."""

    timeout = 120

    def setUp(self) -> None:
        self.cluster = shared_fixture("cluster-compose-like",
                                      lambda: make_cluster(password=PASSWORD, announce=compose_like))
        self.cluster.wait_ok()
        self.db = shared_fixture("database", make_database)
        self.publisher = ClusterPublisher(self.cluster)
        self.addCleanup(self.publisher.close)

    def start(self, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
        out = tempfile.mkdtemp(prefix="autogpt-ws-dropin-")
        log_path = os.path.join(out, "server.log")
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ws.py")], cwd=out, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)

        def kill() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

        self.addCleanup(kill)
        return proc, log_path

    @inlineCallbacks
    def wait_ready(self, port: int, proc: subprocess.Popen[bytes], log_path: str) -> Any:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited {proc.returncode}: {open(log_path).read()}")
            try:
                status, body = yield http_get(port, "/ready")
                if status == 200:
                    return
            except Exception:
                pass
            yield sleep(0.1)
        raise AssertionError(f"not ready: {open(log_path).read()}")

    @inlineCallbacks
    def test_the_websocket_service_environment_alone(self) -> Any:
        pair = keypair("ec")
        files_port = serve_files(self, {"api/auth/jwks": jwks(pair)})
        user, someone = uid("user"), uid("user")
        graph, execution, deleted, foreign = uid("g"), uid("e"), uid("e"), uid("e")
        for run, owner in ((execution, user), (deleted, user), (foreign, someone)):
            self.db.add(run, graph, owner, schema="platform")
        self.db.soft_delete(deleted, schema="platform")
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1",
            # what AutoGPT's compose gives websocket_server, and nothing of ours
            "REDIS_HOST": "localhost", "REDIS_PORT": str(self.cluster.ports[0]), "REDIS_PASSWORD": PASSWORD,
            "REDIS_USE_ANNOUNCED_ADDRESS": "true",
            "DATABASE_URL": f"{self.db.url}?schema=platform&connection_limit=5&connect_timeout=10",
            "JWT_JWKS_URL": f"http://127.0.0.1:{files_port}/api/auth/jwks",
            "JWT_JWKS_ALGORITHMS": "ES256,RS256,EdDSA", "ENABLE_AUTH": "true",
            "WEBSOCKET_SERVER_HOST": "127.0.0.1", "WEBSOCKET_SERVER_PORT": str(port),
            "BACKEND_CORS_ALLOW_ORIGINS": '["http://localhost:3000"]', "APP_ENV": "local", "ENABLE_METRICS": "true",
            "EXECUTION_EVENT_BUS_NAME": "execution_event", "NOTIFICATION_EVENT_BUS_NAME": "notification_event",
            "MAX_MESSAGE_SIZE_LIMIT": "16777216",
        }
        proc, log_path = self.start(env)
        yield self.wait_ready(port, proc, log_path)
        self.assertIn("is a Redis Cluster (cluster_enabled:1): using the redis-cluster event bus",
                      open(log_path).read())

        # a Better Auth token: ES256, kid, aud authenticated, iss the frontend (not checked), 1 h
        good = pair.token(sub=user, iss="http://localhost:3000", exp=int(time.time()) + 3600)
        client = yield ws_connect(port, token=good, test=self)
        replies = []
        for method, field, ident in ((wire.SUBSCRIBE_EXEC, "graph_exec_id", execution),
                                     (wire.SUBSCRIBE_GRAPH, "graph_id", graph)):
            reply = yield client.request(json.dumps({"method": method, "data": {field: ident}}))
            replies.append(reply)
        exec_key, graph_key = wire.exec_key(user, execution), wire.graph_key(user, graph)
        self.assertEqual(replies, [wire.subscribed(wire.SUBSCRIBE_EXEC, exec_key),
                                   wire.subscribed(wire.SUBSCRIBE_GRAPH, graph_key)])

        # as today's executors publish: SPUBLISH to both channels of the run
        run = publish.graph_event(user, graph, execution, "RUNNING")
        node = publish.node_event(user, graph, execution, uid("ne"), "COMPLETED", output_data={"out": ["ünï"]})
        note = publish.notification(user, "agent_run", "Run finished")
        yield publish.publish_event(self.publisher, LAYOUT, run, sharded=True)
        yield publish.publish_event(self.publisher, LAYOUT, node, sharded=True)
        yield publish.publish_notification(self.publisher, LAYOUT, note)
        try:
            yield client.message(6, timeout=10)
        except Exception:
            self.fail(f"got {client.messages}; log: {open(log_path).read()}")

        def raw(event: dict[str, Any]) -> bytes:
            return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()

        self.assertEqual(client.messages[2:], [
            wire.push(wire.GRAPH_EVENT, exec_key, raw(run)), wire.push(wire.GRAPH_EVENT, graph_key, raw(run)),
            wire.push(wire.NODE_EVENT, exec_key, raw(node)), wire.push(wire.NODE_EVENT, graph_key, raw(node)),
            wire.push(wire.NOTIFICATION, None, raw(note["payload"])),
        ])

        # upstream's refusals, byte for byte
        for ident in (uid("unknown"), deleted, foreign):
            reply = yield client.request(json.dumps({"method": wire.SUBSCRIBE_EXEC, "data": {"graph_exec_id": ident}}))
            self.assertEqual(reply, error_frame(f"graph_exec #{ident} not found for user #{user}"))
        reply = yield client.request(json.dumps({"method": wire.SUBSCRIBE_GRAPH, "data": {"graph_id": "*"}}))
        self.assertEqual(reply, error_frame(
            f"channel_key 'execution_event/{{{user}/*}}/all' contains a wildcard; sharded pub/sub "
            "(SSUBSCRIBE) requires exact channel names."))
        for bad in ("", "token=", f"token={pair.token(sub=user, aud='someone-else')}",
                    f"token={token(sub=user)}"):  # missing, empty, wrong audience, an HS256 token
            data = yield raw_request(port, upgrade_request("/ws?" + bad))
            self.assertTrue(data.startswith(b"HTTP/1.1 403 "), (bad, data[:60]))

        status, body = yield http_get(port, "/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b"autogpt_websocket_connections_total 1.0", body)

        proc.send_signal(signal.SIGTERM)
        code, reason = yield client.closed
        self.assertEqual(code, 1001)
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            yield sleep(0.05)
        self.assertEqual(proc.returncode, 0, open(log_path).read())
        self.assertNotIn(good, open(log_path).read())


class Detection(TestCase):
    """EVENT_BUS unset, a Redis named: the server asks it what it is."""

    timeout = 60

    def serve(self, **env: str) -> WebsocketServer:
        settings = load(None, env={"ENABLE_AUTH": "false", "WEBSOCKET_SERVER_HOST": "127.0.0.1",
                                   "WEBSOCKET_SERVER_PORT": "0", **env})
        return start_server(self, settings)

    @inlineCallbacks
    def test_a_cluster_is_found_and_used(self) -> Any:
        cluster = shared_fixture("cluster-0", lambda: make_cluster(0, 5000))
        cluster.wait_ok()
        database = shared_fixture("database", make_database)
        lines = captured_log(self)
        server = self.serve(REDIS_HOST="127.0.0.1", REDIS_PORT=str(cluster.ports[1]), DATABASE_URL=database.url)
        self.assertEqual(server.settings.event_bus, "auto")
        yield wait_for(lambda: server.ready()[0], timeout=15)
        self.assertEqual(server.bus.inner.kind, "redis-cluster")
        self.assertTrue(any("is a Redis Cluster (cluster_enabled:1): using the redis-cluster event bus" in line
                            for line in lines), lines)
        publisher = ClusterPublisher(cluster)
        self.addCleanup(publisher.close)
        graph = uid("g")
        client = yield ws_connect(server.port, test=self)
        yield client.request(json.dumps({"method": wire.SUBSCRIBE_GRAPH, "data": {"graph_id": graph}}))
        yield wait_for(lambda: server.ready()[0], timeout=10)
        yield publish.publish_event(publisher, LAYOUT, publish.graph_event(U, graph, uid("e"), "QUEUED"), sharded=True)
        frame = yield client.message(1, timeout=10)
        self.assertTrue(frame.startswith(b'{"method":"graph_execution_event"'), frame)

    @inlineCallbacks
    def test_a_single_redis_is_found_and_used(self) -> Any:
        redis = redis_server(self)
        lines = captured_log(self)
        server = self.serve(REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis.port))
        yield wait_for(lambda: server.ready()[0], timeout=10)
        self.assertEqual(server.bus.inner.kind, "redis")
        self.assertTrue(any("is a single Redis (cluster_enabled:0): using the redis event bus" in line
                            for line in lines), lines)
        client = yield ws_connect(server.port, test=self)
        yield client.request(json.dumps({"method": wire.SUBSCRIBE_EXEC, "data": {"graph_exec_id": "e1"}}))
        event = publish.graph_event(U, "g1", "e1", "COMPLETED")
        redis.command("PUBLISH", LAYOUT.classic_exec(U, "g1", "e1"), publish.envelope(event))
        frame = yield client.message(1, timeout=10)
        self.assertTrue(frame.startswith(b'{"method":"graph_execution_event"'), frame)
        # the demo executor publishes through whichever bus was found
        self.assertEqual(server.bus.producer(), (server.bus.inner.publisher, False))

    @inlineCallbacks
    def test_unreachable_then_found(self) -> Any:
        """While nothing answers, /ready says why and the server keeps
        asking, with backoff; once a Redis is there, it is used."""
        port = free_port()
        server = self.serve(REDIS_HOST="127.0.0.1", REDIS_PORT=str(port))
        yield wait_for(lambda: server.bus.attempts >= 2, timeout=10)
        status, body = yield http_get(server.port, "/ready")
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(body), {"status": "not ready", "reason":
                         f"finding out whether the Redis at 127.0.0.1:{port} is a cluster: connection refused"})
        self.assertIsNone(server.bus.producer())
        client = yield ws_connect(server.port, test=self)  # sockets are served meanwhile
        reply = yield client.request(json.dumps({"method": wire.SUBSCRIBE_EXEC, "data": {"graph_exec_id": "e2"}}))
        self.assertEqual(json.loads(reply)["success"], True)
        redis = RedisServer(port=port).start()
        self.addCleanup(redis.cleanup)
        yield wait_for(lambda: server.ready()[0], timeout=15)
        self.assertEqual(server.bus.inner.kind, "redis")
        event = publish.graph_event(U, "g2", "e2", "RUNNING")
        redis.command("PUBLISH", LAYOUT.classic_exec(U, "g2", "e2"), publish.envelope(event))
        frame = yield client.message(1, timeout=10)
        self.assertIn(b'"channel":"%s|graph_exec#e2"' % U.encode(), frame)

    @inlineCallbacks
    def test_password_refused_then_right(self) -> Any:
        redis = redis_server(self, extra=("--requirepass", "right"))
        wrong = self.serve(REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis.port), REDIS_PASSWORD="wrong")
        right = self.serve(REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis.port), REDIS_PASSWORD="right")
        yield wait_for(lambda: wrong.bus.attempts >= 2 and right.ready()[0], timeout=10)
        ready, reason = wrong.ready()
        self.assertFalse(ready)
        self.assertIn("WRONGPASS", reason)
        self.assertNotIn("wrong", reason.replace("WRONGPASS", ""))
        self.assertIsNone(wrong.bus.inner)

    def serve_with(self, settings: Any, build: Any) -> WebsocketServer:
        """A running server whose auto bus builds the bus found with
        ``build(kind, server)``."""
        from autogpt_ws.bus.detect import AutoBus

        holder: list[WebsocketServer] = []
        server = WebsocketServer(settings, reactor=reactor,
                                 bus=AutoBus(settings, reactor, lambda kind: build(kind, holder[0])))
        holder.append(server)
        server.privilegedStartService()
        server.startService()
        self.addCleanup(lambda: server.stopService() if server.running else None)
        return server

    @inlineCallbacks
    def test_a_bus_that_fails_to_start_is_asked_again(self) -> Any:
        """The bus found cannot be built once (a bug, a resource short):
        logged, /ready says why, and the question is asked again with
        backoff until the bus is built; the server ends up ready."""
        from autogpt_ws.running.service import make_bus

        redis = redis_server(self)
        settings = load(None, env={"ENABLE_AUTH": "false", "WEBSOCKET_SERVER_HOST": "127.0.0.1",
                                   "WEBSOCKET_SERVER_PORT": "0", "REDIS_HOST": "127.0.0.1",
                                   "REDIS_PORT": str(redis.port)})
        built: list[str] = []

        def build(kind: str, server: WebsocketServer) -> Any:
            built.append(kind)
            if len(built) == 1:
                raise ValueError("no bus this time")
            return make_bus(settings, server.router, reactor, server.stats, server.hub, kind)

        server = self.serve_with(settings, build)
        yield wait_for(lambda: built, timeout=10)
        self.assertEqual(server.ready(), (False, f"finding out whether the Redis at 127.0.0.1:{redis.port} is a "
                                                 "cluster: cannot start the redis event bus: no bus this time"))
        yield wait_for(lambda: server.ready()[0], timeout=15)
        self.assertEqual(built, ["redis", "redis"])
        self.assertEqual(server.bus.inner.kind, "redis")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    @inlineCallbacks
    def test_the_next_seed_is_asked_when_one_is_down(self) -> Any:
        """REDIS_CLUSTER_NODES lists more seeds: an attempt asks the next
        one in turn, so a first seed that is down does not stop detection."""
        cluster = shared_fixture("cluster-0", lambda: make_cluster(0, 5000))
        cluster.wait_ok()
        dead = free_port()
        server = self.serve(REDIS_CLUSTER_HOST="127.0.0.1", REDIS_CLUSTER_PORT=str(dead),
                            REDIS_CLUSTER_NODES=f"127.0.0.1:{cluster.ports[0]}",
                            DATABASE_URL="postgresql://unused@127.0.0.1:9/unused")
        yield wait_for(lambda: server.ready()[0], timeout=20)
        self.assertEqual(server.bus.inner.kind, "redis-cluster")
        self.assertEqual(server.bus.address, ("127.0.0.1", cluster.ports[0]))
        self.assertEqual(server.bus.attempts, 2)

    @inlineCallbacks
    def test_a_tls_peer_that_never_closes_does_not_hold_detection(self) -> Any:
        """Over TLS a close waits for the peer's close_notify: a Redis (or a
        proxy) that answers INFO and then never closes must not keep the
        question open once it is answered."""
        from tests.test_bus_redis import write_pki

        directory = tempfile.mkdtemp(prefix="autogpt-ws-detect-tls-")
        ca = write_pki(directory)
        peer = DeafTLSRedis(self, directory)
        settings = load(None, env={"ENABLE_AUTH": "false", "WEBSOCKET_SERVER_HOST": "127.0.0.1",
                                   "WEBSOCKET_SERVER_PORT": "0", "REDIS_URL": f"rediss://localhost:{peer.port}",
                                   "REDIS_TLS_CA_FILE": ca, "REDIS_CONNECT_TIMEOUT": "30"})
        from autogpt_ws.bus.memory import MemoryBus

        built: list[str] = []

        def build(kind: str, server: WebsocketServer) -> Any:
            built.append(kind)
            return MemoryBus(server.router)

        server = self.serve_with(settings, build)
        yield wait_for(lambda: server.ready()[0], timeout=10)
        self.assertEqual(built, ["redis"])
        self.assertTrue(peer.answered.is_set())

    @inlineCallbacks
    def test_hang_up_ends_a_tls_connection_the_peer_never_closes(self) -> Any:
        """bus/shard.hang_up, which ends the detection's question and the
        cluster bus's slot-map questions alike: once the answer is in, a
        TLS peer that never answers the close does not keep the connection
        (nor the one asking) waiting for the connection's deadline."""
        from twisted.internet import reactor

        from autogpt_ws.bus.resp import connect, handshake
        from autogpt_ws.bus.shard import hang_up
        from tests.test_bus_redis import write_pki

        directory = tempfile.mkdtemp(prefix="autogpt-ws-hangup-tls-")
        ca = write_pki(directory)
        peer = DeafTLSRedis(self, directory)
        conn = yield connect(reactor, "localhost", peer.port, timeout=10, tls=True, ca_file=ca)
        yield handshake(conn, name="autogpt-ws-test")
        info = yield conn.command("INFO", "cluster")
        self.assertIn(b"cluster_enabled:0", info)
        deadline = reactor.callLater(60, conn.transport.abortConnection)
        ended = hang_up(conn, deadline)
        yield wait_for(lambda: ended.called, timeout=5)  # a close would wait for the deadline: 60 s
        self.assertFalse(conn.connected)
        self.assertFalse(deadline.active())

    @inlineCallbacks
    def test_a_named_bus_wins(self) -> Any:
        cluster = shared_fixture("cluster-0", lambda: make_cluster(0, 5000))
        server = self.serve(REDIS_HOST="127.0.0.1", REDIS_PORT=str(cluster.ports[0]), EVENT_BUS="redis")
        yield wait_for(lambda: server.ready()[0], timeout=10)
        self.assertEqual(server.bus.kind, "redis")
        memory = self.serve(REDIS_HOST="127.0.0.1", REDIS_PORT=str(cluster.ports[0]), EVENT_BUS="memory")
        self.assertEqual(memory.bus.kind, "memory")

    def test_nothing_named_runs_the_embedded_bus(self) -> None:
        server = self.serve()
        self.assertEqual((server.bus.kind, server.ready()), ("memory", (True, "")))


class AnnouncedAddresses(TestCase):
    """REDIS_USE_ANNOUNCED_ADDRESS on a real cluster whose nodes listen on
    127.0.0.1 and 127.0.0.2 and announce 127.0.0.2 (or, as endpoint, a host
    name nobody resolves)."""

    timeout = 60

    def setUp(self) -> None:
        self.cluster = shared_fixture("cluster-announcing", lambda: make_cluster(
            bind=("127.0.0.1", "127.0.0.2"), announce=announcing))
        self.cluster.wait_ok()
        self.publisher = ClusterPublisher(self.cluster)
        self.addCleanup(self.publisher.close)

    def endpoint(self, kind: str) -> None:
        """What CLUSTER SLOTS names as each node's address: ip or hostname."""
        for port in self.cluster.ports:
            redis_call(port, "CONFIG", "SET", "cluster-preferred-endpoint-type", kind)
        if kind != "ip":
            self.addCleanup(self.endpoint, "ip")

    def serve(self, announced: bool) -> WebsocketServer:
        settings = load(None, env={"ENABLE_AUTH": "false", "WEBSOCKET_SERVER_HOST": "127.0.0.1",
                                   "WEBSOCKET_SERVER_PORT": "0", "REDIS_HOST": "127.0.0.1",
                                   "REDIS_PORT": str(self.cluster.ports[0]),
                                   "REDIS_USE_ANNOUNCED_ADDRESS": "true" if announced else "false",
                                   "DATABASE_URL": "postgresql://unused@127.0.0.1:9/unused"})
        return start_server(self, settings)

    def local_addresses(self) -> set[str]:
        """The address each node sees our subscriber connections arrive at."""
        seen = set()
        for port in self.cluster.ports:
            for line in redis_call(port, "CLIENT", "LIST").decode().splitlines():
                fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
                if fields.get("name") == "autogpt-ws-cluster":
                    seen.add(fields["laddr"])
        return seen

    @inlineCallbacks
    def delivers(self, server: WebsocketServer) -> Any:
        graph = uid("g")
        client = yield ws_connect(server.port, test=self)
        yield client.request(json.dumps({"method": wire.SUBSCRIBE_GRAPH, "data": {"graph_id": graph}}))
        yield wait_for(lambda: server.ready()[0], timeout=10)
        yield publish.publish_event(self.publisher, LAYOUT, publish.graph_event(U, graph, uid("e"), "QUEUED"),
                                    sharded=True)
        frame = yield client.message(1, timeout=10)
        self.assertIn(b'"channel":"%s|graph#%s|executions"' % (U.encode(), graph.encode()), frame)

    @inlineCallbacks
    def test_default_reaches_shards_at_the_seed_host(self) -> Any:
        server = self.serve(announced=False)
        yield wait_for(lambda: server.ready()[0], timeout=15)
        self.assertEqual(set(server.bus.inner.links), {("127.0.0.1", p) for p in self.cluster.ports})
        self.assertEqual(self.local_addresses(), {f"127.0.0.1:{p}" for p in self.cluster.ports})
        yield self.delivers(server)

    @inlineCallbacks
    def test_announced_addresses_when_asked(self) -> Any:
        server = self.serve(announced=True)
        yield wait_for(lambda: server.ready()[0], timeout=15)
        self.assertEqual(set(server.bus.inner.links), {("127.0.0.2", p) for p in self.cluster.ports})
        self.assertEqual(self.local_addresses(), {f"127.0.0.2:{p}" for p in self.cluster.ports})
        yield self.delivers(server)

    @inlineCallbacks
    def test_announced_host_names(self) -> Any:
        """Host names as endpoints: reached at the seed host by default (they
        may resolve only inside the cluster's network); used as they are
        when asked, so names that do not resolve leave the bus not ready,
        saying which."""
        self.endpoint("hostname")
        by_seed = self.serve(announced=False)
        yield wait_for(lambda: by_seed.ready()[0], timeout=15)
        self.assertEqual(set(by_seed.bus.inner.links), {("127.0.0.1", p) for p in self.cluster.ports})
        yield self.delivers(by_seed)
        by_name = self.serve(announced=True)
        yield wait_for(lambda: by_name.bus.inner is not None and by_name.bus.inner.slots is not None, timeout=15)
        self.assertEqual({host for host, _ in by_name.bus.inner.links},
                         {f"shard-{i}.invalid" for i in range(3)})
        yield sleep(0.5)
        ready, reason = by_name.ready()
        self.assertFalse(ready)
        self.assertIn("shard node(s) not connected: shard-", reason)


class CleartextKeySet(TestCase):
    """A JWKS over plain http on a host that is not local: tokens verify,
    and the server warns once at start unless told the path is trusted."""

    @inlineCallbacks
    def check(self, allow: bool) -> Any:
        from twisted.web.server import Site

        from tests.test_auth import KeySetPage

        pair = keypair("ec")
        site = Site(KeySetPage(jwks(pair)))
        site.noisy = False
        listening = reactor.listenTCP(0, site, interface="127.0.0.2")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        lines = captured_log(self)
        server = start_server(self, enable_auth=True, auth_failure="close",
                              jwt_jwks_url=f"http://127.0.0.2:{listening.getHost().port}/api/auth/jwks",
                              jwks_allow_insecure_transport=allow)
        client = yield ws_connect(server.port, token=pair.token(sub="user-jwks"), test=self)
        reply = yield client.request(json.dumps({"method": wire.SUBSCRIBE_GRAPH, "data": {"graph_id": "g"}}))
        self.assertEqual(json.loads(reply)["channel"], "user-jwks|graph#g|executions")
        return [line for line in lines if "cleartext http://" in line]

    @inlineCallbacks
    def test_warns(self) -> Any:
        warnings = yield self.check(allow=False)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("(127.0.0.2)", warnings[0])
        self.assertIn("JWKS_ALLOW_INSECURE_TRANSPORT=true", warnings[0])

    @inlineCallbacks
    def test_silenced(self) -> Any:
        warnings = yield self.check(allow=True)
        self.assertEqual(warnings, [])

    def test_local_hosts_are_trusted(self) -> None:
        from autogpt_ws.sockets.auth import cleartext_remote_host

        for url in ("http://localhost:3000/api/auth/jwks", "http://127.0.0.1:3000/x", "http://[::1]:3000/x",
                    "http://frontend:3000/api/auth/jwks", "https://auth.example.com/jwks", "file:///keys.json"):
            self.assertIsNone(cleartext_remote_host(url), url)
        self.assertEqual(cleartext_remote_host("http://auth.example.com/jwks"), "auth.example.com")
        self.assertEqual(cleartext_remote_host("http://10.0.0.7:3000/jwks"), "10.0.0.7")
