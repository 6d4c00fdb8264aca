"""The classic Redis bus against a real redis-server on a free port: delivery
end to end, routing and drop rules, faults and recovery, scale-out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, LoopingCall
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from autogpt_ws.bus.redis import BACKOFF_MAX, RedisBus, RedisPublisher
from autogpt_ws.bus.resp import connect as resp_connect
from autogpt_ws.core.channels import Layout
from autogpt_ws.core.hub import Hub
from autogpt_ws.core.router import Router
from autogpt_ws.producing import publish
from autogpt_ws.running.service import WebsocketServer
from autogpt_ws.running.tap import build
from autogpt_ws.stats import Stats
from tests.helpers import (SECRET, RedisServer, SilentServer, U, connect, free_port, http_get, make_settings, padded,
                           redis_clients, redis_server, start_server, token, wait_for)

LAYOUT = Layout()


def event_bytes(event: dict[str, Any]) -> bytes:
    """The event exactly as it sits inside its published envelope."""
    return publish.envelope(event)[len(b'{"payload":'):-1]


def pushed(method: str, key: str | None, data: bytes) -> bytes:
    channel = b"null" if key is None else b'"' + key.encode() + b'"'
    return b'{"method":"%s","data":%s,"success":null,"channel":%s,"error":null}' % (method.encode(), data, channel)


def sub_exec(exec_id: str) -> str:
    return json.dumps({"method": "subscribe_graph_execution", "data": {"graph_exec_id": exec_id}})


def sub_graph(graph_id: str) -> str:
    return json.dumps({"method": "subscribe_graph_executions", "data": {"graph_id": graph_id}})


class LogCapture:
    """Events logged by the Redis bus module, while the test runs."""

    def __init__(self, test: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "autogpt_ws.bus.redis":
            self.events.append(event)
        elif "factory" in (event.get("log_format") or "") and str(event.get("log_namespace")).startswith(
                ("twisted.internet.endpoints", "twisted.internet.protocol", "autogpt_ws.bus")):
            self.events.append(event)  # a "Starting factory" line per attempt or probe would be noise

    def operator_lines(self) -> list[str]:
        """What an operator sees at the default level (info)."""
        return [e["log_format"] for e in self.events if e["log_level"] >= LogLevel.info]

    def count(self, prefix: str) -> int:
        return sum(1 for e in self.events if (e.get("log_format") or "").startswith(prefix))

    def text(self) -> str:
        return repr(self.events)


def bus_settings(redis_port: int, **overrides: Any) -> Any:
    return make_settings(event_bus="redis", redis_host="127.0.0.1", redis_port=redis_port, **overrides)


@inlineCallbacks
def ready_server(test: TestCase, redis: RedisServer, **overrides: Any) -> Any:
    server = start_server(test, bus_settings(redis.port, **overrides))
    yield wait_for(lambda: server.ready()[0])
    return server


def publisher_for(test: TestCase, redis: RedisServer) -> RedisPublisher:
    pub = RedisPublisher.from_settings(bus_settings(redis.port), reactor)
    test.addCleanup(pub.close)
    return pub


class Delivery(TestCase):
    """publish -> Redis -> server -> socket, byte for byte."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.redis = redis_server(self)
        self.server = yield ready_server(self, self.redis)
        self.pub = publisher_for(self, self.redis)

    @inlineCallbacks
    def test_graph_node_and_notification_events(self) -> Any:
        client = yield connect(self.server.port, token="t", test=self)
        yield client.request(sub_exec("e1"))
        yield client.request(sub_graph("g1"))
        node = publish.node_event(U, "g1", "e1", "ne1", "COMPLETED", output_data={"out": ["é ✓"]})
        graph = publish.graph_event(U, "g1", "e1", "RUNNING")
        note = publish.notification(U, "execution_completed", "done", graph_exec_id="e1")
        receivers = yield publish.publish_event(self.pub, LAYOUT, node)
        self.assertEqual(receivers, [1])
        yield publish.publish_event(self.pub, LAYOUT, graph)
        yield publish.publish_notification(self.pub, LAYOUT, note)
        yield client.message(5)
        frames = client.messages[2:6]
        self.assertEqual(frames[0], pushed("node_execution_event", f"{U}|graph_exec#e1", event_bytes(node)))
        # a graph event goes to both keys of a socket subscribed to both
        self.assertEqual(sorted(frames[1:3]), sorted([
            pushed("graph_execution_event", f"{U}|graph_exec#e1", event_bytes(graph)),
            pushed("graph_execution_event", f"{U}|graph#g1|executions", event_bytes(graph)),
        ]))
        inner = json.dumps(note["payload"], separators=(",", ":"), ensure_ascii=False).encode()
        self.assertEqual(frames[3], pushed("notification", None, inner))

    @inlineCallbacks
    def test_forwarded_byte_for_byte(self) -> Any:
        """Spacing, key order and escapes of the producer's JSON reach the
        socket untouched."""
        client = yield connect(self.server.port, token="t", test=self)
        yield client.request(sub_exec("e2"))
        event = (b'{ "user_id" : "%s", "graph_id":"g", "graph_exec_id":"e2", "z":"\\u00e9", "a" : [1, 2.50],'
                 b' "event_type":"node_execution_update" }' % U.encode())
        yield self.pub.publish(LAYOUT.classic_exec(U, "g", "e2"), b'{"payload": ' + event + b'}')
        frame = yield client.message(1)
        self.assertEqual(frame, pushed("node_execution_event", f"{U}|graph_exec#e2", event))


class Routing(TestCase):
    def setUp(self) -> Any:
        self.redis = redis_server(self)
        self.pub = publisher_for(self, self.redis)

    @inlineCallbacks
    def test_filtering_across_users(self) -> Any:
        server = yield ready_server(self, self.redis, enable_auth=True, jwt_verify_key=SECRET)
        alice = yield connect(server.port, token=token("alice"), test=self)
        bob = yield connect(server.port, token=token("bob"), test=self)
        for client in (alice, bob):
            yield client.request(sub_exec("shared"))
            yield client.request(sub_graph("g"))
        for_alice = publish.node_event("alice", "g", "shared", "n-a", "RUNNING")
        for_bob = publish.node_event("bob", "g", "shared", "n-b", "RUNNING")
        yield publish.publish_event(self.pub, LAYOUT, for_alice)
        yield publish.publish_notification(self.pub, LAYOUT, publish.notification("alice", "t", "for alice"))
        yield publish.publish_event(self.pub, LAYOUT, for_bob)
        # one subscriber connection keeps publish order: bob's first push is his own event
        self.assertEqual((yield bob.message(2)), pushed("node_execution_event", "bob|graph_exec#shared", event_bytes(for_bob)))
        self.assertEqual((yield alice.message(2)), pushed("node_execution_event", "alice|graph_exec#shared", event_bytes(for_alice)))
        self.assertIn(b'"event":"for alice"', (yield alice.message(3)))
        self.assertEqual(len(bob.messages), 3)
        self.assertEqual(len(alice.messages), 4)

    @inlineCallbacks
    def test_unwanted_event_discarded_without_decoding(self) -> Any:
        server = yield ready_server(self, self.redis)
        client = yield connect(server.port, token="t", test=self)
        yield client.request(sub_exec("mine"))
        stats = server.stats
        garbage = b"\xff\xfe this is not JSON {"
        yield self.pub.publish(LAYOUT.classic_exec(U, "g", "not-subscribed"), garbage)
        yield self.pub.publish(LAYOUT.classic_exec("someone-else", "g", "mine"), garbage)
        yield self.pub.publish(LAYOUT.notification("someone-else"), garbage)
        yield wait_for(lambda: stats.events_received == 3)
        self.assertEqual(stats.events_ignored, 3)
        self.assertEqual(sum(stats.events_dropped.values()), 0)  # never opened, so never found malformed
        # the same bytes on a channel somebody wants are opened, and dropped
        yield self.pub.publish(LAYOUT.classic_exec(U, "g", "mine"), garbage)
        yield wait_for(lambda: stats.events_dropped["malformed"] == 1)
        self.assertEqual(len(client.messages), 1)

    @inlineCallbacks
    def test_drop_rules_never_stop_the_stream(self) -> Any:
        server = yield ready_server(self, self.redis)
        client = yield connect(server.port, token="t", test=self)
        yield client.request(sub_exec("e"))
        channel = LAYOUT.classic_exec(U, "g", "e")
        big = publish.node_event(U, "g", "e", "n-big", "COMPLETED", output_data={"x": ["y" * 2000]})
        oversized = publish.envelope(big, max_size=1000)
        self.assertIn(b"error_comms_update", oversized)
        bad = [
            oversized,
            b'{"payload": {"user_id": "' + U.encode() + b'", "graph_id"',  # truncated JSON
            b'{"not_payload": {}}',
            b'{"payload": "a string"}',
            publish.envelope({**publish.node_event(U, "g", "e", "n", "RUNNING"), "event_type": "something_new"}),
            publish.envelope(publish.node_event("intruder", "g", "e", "n", "RUNNING")),  # ids not the channel's
        ]
        for data in bad:
            yield self.pub.publish(channel, data)
        good = publish.node_event(U, "g", "e", "n-ok", "RUNNING")
        yield publish.publish_event(self.pub, LAYOUT, good)
        self.assertEqual((yield client.message(1)), pushed("node_execution_event", f"{U}|graph_exec#e", event_bytes(good)))
        self.assertEqual(dict(server.stats.events_dropped),
                         {"oversized": 1, "malformed": 3, "unknown_type": 1, "channel_mismatch": 1})
        self.assertEqual(server.stats.events_forwarded, 1)
        self.assertEqual(server.ready(), (True, ""))
        yield self.pub.publish("execution_event/a/b/c/d", b"{}")  # matches the pattern, not the layout
        yield wait_for(lambda: server.stats.events_dropped["bad_channel"] == 1)

    @inlineCallbacks
    def test_max_message_size_limit_applied(self) -> Any:
        server = yield ready_server(self, self.redis, max_message_size_limit=2048)
        client = yield connect(server.port, token="t", test=self)
        yield client.request(sub_exec("e"))
        over = padded(publish.node_event(U, "g", "e", "n-over", "RUNNING"), 2049)
        at_limit = padded(publish.node_event(U, "g", "e", "n-at", "RUNNING"), 2048)
        yield publish.publish_event(self.pub, LAYOUT, over)
        yield publish.publish_event(self.pub, LAYOUT, at_limit)
        self.assertEqual((yield client.message(1)), pushed("node_execution_event", f"{U}|graph_exec#e", event_bytes(at_limit)))
        self.assertEqual(server.stats.events_dropped["oversized"], 1)


class Faults(TestCase):
    """Real outages of a real redis-server; the socket side keeps serving."""

    @inlineCallbacks
    def assert_serving(self, server: WebsocketServer) -> Any:
        client = yield connect(server.port, token="t", test=self)
        reply = yield client.request('{"method":"heartbeat","data":"ping","success":true}')
        self.assertEqual(reply, b'{"method":"heartbeat","data":"pong","success":true}')
        yield client.disconnect()

    @inlineCallbacks
    def assert_delivers(self, server: WebsocketServer, pub: RedisPublisher, exec_id: str) -> Any:
        client = yield connect(server.port, token="t", test=self)
        yield client.request(sub_exec(exec_id))
        event = publish.node_event(U, "g", exec_id, "n", "RUNNING")
        yield publish.publish_event(pub, LAYOUT, event)
        self.assertEqual((yield client.message(1)), pushed("node_execution_event", f"{U}|graph_exec#{exec_id}", event_bytes(event)))
        yield client.disconnect()

    @inlineCallbacks
    def wait_backoff_beyond(self, server: WebsocketServer, seconds: float) -> Any:
        """Let the outage last until the next attempt is more than
        ``seconds`` away: recovery must not wait for it."""
        bus = server.bus
        yield wait_for(lambda: bus._delay > seconds * 2 and "retry" in bus._timers, timeout=15)

    @inlineCallbacks
    def test_down_at_startup(self) -> Any:
        logs = LogCapture(self)
        port = free_port()
        server = start_server(self, bus_settings(port))
        yield wait_for(lambda: server.bus.state == "waiting")
        code, body = yield http_get(server.port, "/ready")
        self.assertEqual(code, 503)
        reply = json.loads(body)
        self.assertEqual(reply["status"], "not ready")
        self.assertIn("connection refused", reply["reason"])
        self.assertIn(f"127.0.0.1:{port}", reply["reason"])
        yield self.assert_serving(server)
        yield self.wait_backoff_beyond(server, 2.0)
        redis = redis_server(self, port=port)
        started = time.monotonic()
        yield wait_for(lambda: server.ready()[0], timeout=2.0)
        self.assertLess(time.monotonic() - started, 2.0)
        code, body = yield http_get(server.port, "/ready")
        self.assertEqual((code, body), (200, b'{"status":"ready"}'))
        yield self.assert_delivers(server, publisher_for(self, redis), "after-start")
        self.assertEqual(logs.count("redis bus unavailable"), 1, logs.text())
        self.assertEqual(logs.count("redis bus connected and subscribed"), 1, logs.text())
        self.assertEqual(server.stats.bus_reconnects, 0)  # the first subscription is no reconnection

    @inlineCallbacks
    def test_restart_on_the_same_port(self) -> Any:
        logs = LogCapture(self)
        redis = redis_server(self)
        server = yield ready_server(self, redis)
        pub = publisher_for(self, redis)
        yield self.assert_delivers(server, pub, "before")
        redis.stop()
        yield wait_for(lambda: not server.ready()[0])
        code, body = yield http_get(server.port, "/ready")
        self.assertEqual(code, 503)
        self.assertIn("lost its connection", json.loads(body)["reason"])
        yield self.assert_serving(server)
        yield self.wait_backoff_beyond(server, 2.0)
        self.assertGreaterEqual(server.bus._failures, 3)
        redis = redis_server(self, port=redis.port)
        started = time.monotonic()
        yield wait_for(lambda: server.ready()[0], timeout=2.0)
        self.assertLess(time.monotonic() - started, 2.0)
        code, _ = yield http_get(server.port, "/ready")
        self.assertEqual(code, 200)
        yield self.assert_delivers(server, pub, "after")
        self.assertEqual(server.stats.bus_reconnects, 1)
        self.assertEqual(len(redis_clients(redis)), 1)
        # each state change once, however many retries there were
        self.assertEqual(logs.count("redis bus lost connection"), 1, logs.text())
        self.assertEqual(logs.count("redis bus unavailable"), 1, logs.text())
        self.assertEqual(logs.count("redis bus connected and subscribed"), 2, logs.text())
        self.assertEqual(len(logs.operator_lines()), 4, logs.operator_lines())  # and nothing else

    @inlineCallbacks
    def test_cut_by_redis_for_its_output_buffer_limit(self) -> Any:
        """A server that reads the bus slower than producers publish: Redis
        buffers for it up to client-output-buffer-limit pubsub, then
        closes the connection.  The bus logs the loss, reconnects and
        resubscribes; /ready says 503 meanwhile; what Redis dropped is lost."""
        logs = LogCapture(self)
        redis = redis_server(self)
        self.assertIn(b"+OK", redis.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 1mb 1mb 0"))
        server = yield ready_server(self, redis)
        pub = publisher_for(self, redis)
        client = yield connect(server.port, token="t", test=self)
        yield client.request(sub_exec("e"))
        subscriber = server.bus._conn.transport
        subscriber.pauseProducing()  # our side falls behind: it stops reading
        pad = "y" * 100_000
        published = 0
        while redis_clients(redis):  # until Redis cuts its pubsub client (past the kernel's buffers)
            self.assertLess(published, 300, "Redis never cut the subscriber")
            yield publish.publish_event(pub, LAYOUT, publish.node_event(U, "g", "e", f"n{published}", "RUNNING",
                                                                        output_data={"out": [pad]}))
            published += 1
        self.assertTrue(server.ready()[0])  # we have not noticed yet: nothing read
        subscriber.resumeProducing()
        yield wait_for(lambda: not server.ready()[0], timeout=10)
        code, body = yield http_get(server.port, "/ready")
        self.assertEqual(code, 503)
        self.assertIn("lost its connection", json.loads(body)["reason"])
        yield wait_for(lambda: server.ready()[0], timeout=10)
        code, _ = yield http_get(server.port, "/ready")
        self.assertEqual(code, 200)
        self.assertEqual(server.stats.bus_reconnects, 1)
        self.assertEqual(logs.count("redis bus lost connection"), 1, logs.text())
        delivered = len(client.messages) - 1
        self.assertLess(delivered, published)  # what Redis held for us when it cut us is lost
        after = publish.node_event(U, "g", "e", "after", "RUNNING")
        yield publish.publish_event(pub, LAYOUT, after)
        self.assertEqual((yield client.message(delivered + 1)),
                         pushed("node_execution_event", f"{U}|graph_exec#e", event_bytes(after)))

    @inlineCallbacks
    def test_connection_cut_mid_stream(self) -> Any:
        """CLIENT KILL while events stream: resubscribed, never two
        subscriber connections, nothing duplicated, order kept."""
        redis = redis_server(self)
        server = yield ready_server(self, redis)
        pub = publisher_for(self, redis)
        client = yield connect(server.port, token="t", test=self)
        yield client.request(sub_exec("stream"))
        seen: list[int] = []
        sample = LoopingCall(lambda: seen.append(len(redis_clients(redis))))
        sample.start(0.02)
        self.addCleanup(lambda: sample.running and sample.stop())
        sent = 0

        def emit() -> None:
            nonlocal sent
            sent += 1
            publish.publish_event(pub, LAYOUT, publish.node_event(U, "g", "stream", f"n{sent}", "RUNNING"))

        stream = LoopingCall(emit)
        stream.start(0.005)
        for cut in range(1, 4):
            before = server.stats.events_forwarded
            yield wait_for(lambda: server.stats.events_forwarded >= before + 5)
            self.assertIn(b":1\r\n", redis.command("CLIENT", "KILL", "TYPE", "pubsub"))
            yield wait_for(lambda: server.stats.bus_reconnects == cut and server.ready()[0], timeout=3)
        before = server.stats.events_forwarded
        yield wait_for(lambda: server.stats.events_forwarded >= before + 5)
        stream.stop()
        sample.stop()
        last = publish.node_event(U, "g", "stream", "last", "COMPLETED")
        yield publish.publish_event(pub, LAYOUT, last)
        yield wait_for(lambda: client.messages and b'"node_exec_id":"last"' in client.messages[-1])
        ids = [json.loads(m)["data"]["node_exec_id"] for m in client.messages[1:]]
        numbers = [int(i[1:]) for i in ids[:-1]]
        self.assertEqual(numbers, sorted(set(numbers)))  # in order, none twice
        self.assertLess(len(numbers), sent)  # events published while cut are lost (pub/sub keeps nothing)
        self.assertEqual(max(seen), 1)
        self.assertEqual(min(seen), 0)  # the sampler did see the cuts
        self.assertEqual(len(redis_clients(redis)), 1)

    @inlineCallbacks
    def test_auth_refused(self) -> Any:
        logs = LogCapture(self)
        redis = redis_server(self, extra=("--requirepass", "s3cret-pw"))
        missing = start_server(self, bus_settings(redis.port))
        wrong = start_server(self, bus_settings(redis.port, redis_password="not-it"))
        yield wait_for(lambda: missing.bus.state == "waiting" and wrong.bus.state == "waiting")
        code, body = yield http_get(missing.port, "/ready")
        self.assertEqual(code, 503)
        self.assertIn("authentication refused by Redis: NOAUTH", json.loads(body)["reason"])
        ready, reason = wrong.ready()
        self.assertFalse(ready)
        self.assertIn("authentication refused by Redis: WRONGPASS", reason)
        yield self.assert_serving(wrong)
        self.assertEqual(redis_clients(redis, password="s3cret-pw"), [])
        right = yield ready_server(self, redis, redis_password="s3cret-pw")
        as_url = yield ready_server(self, redis, redis_url=f"redis://:s3cret-pw@127.0.0.1:{redis.port}/2")
        self.assertEqual(len(redis_clients(redis, password="s3cret-pw")), 2)
        pub = RedisPublisher.from_settings(bus_settings(redis.port, redis_password="s3cret-pw", redis_db=2), reactor)
        self.addCleanup(pub.close)
        yield self.assert_delivers(right, pub, "pw")
        yield self.assert_delivers(as_url, pub, "url")  # pub/sub ignores the db number
        self.assertNotIn("s3cret", as_url.bus.describe() + right.bus.describe() + wrong.ready()[1])
        self.assertNotIn("s3cret", logs.text())
        self.assertNotIn("not-it", logs.text())
        self.assertIn("redis://127.0.0.1:%d/2" % redis.port, as_url.bus.describe())

    @inlineCallbacks
    def test_half_open_connection_detected_by_ping(self) -> Any:
        """A Redis that stops answering (SIGSTOP) is noticed by the PING
        keepalive; attempts meanwhile time out in the handshake; service
        resumes when it answers again."""
        redis = redis_server(self)
        server = WebsocketServer(bus_settings(redis.port, redis_connect_timeout=0.3), reactor=reactor)
        server.bus.ping_interval = 0.1
        server.bus.ping_timeout = 0.3
        server.privilegedStartService()
        server.startService()
        self.addCleanup(lambda: server.stopService() if server.running else None)
        yield wait_for(lambda: server.ready()[0])
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: redis.process and redis.process.send_signal(signal.SIGCONT))
        yield wait_for(lambda: not server.ready()[0])
        self.assertIn("no reply to PING within 0.3s", server.ready()[1])
        yield wait_for(lambda: "no answer within 0.3s" in server.ready()[1], timeout=5)
        redis.process.send_signal(signal.SIGCONT)
        yield wait_for(lambda: server.ready()[0], timeout=10)
        yield self.assert_delivers(server, publisher_for(self, redis), "ping")
        yield wait_for(lambda: len(redis_clients(redis)) == 1)

    @inlineCallbacks
    def test_a_busy_server_keeps_its_subscription(self) -> Any:
        """The answer to the keepalive PING comes after every message Redis
        queued before it: a server still reading a long backlog past the
        ping timeout is busy, not cut off, and must not drop (and lose) its
        subscription."""
        redis = redis_server(self)
        redis.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 0 0 0")
        server = WebsocketServer(bus_settings(redis.port), reactor=reactor)
        server.bus.ping_interval = 0.02
        server.bus.ping_timeout = 0.1
        server.privilegedStartService()
        server.startService()
        self.addCleanup(lambda: server.stopService() if server.running else None)
        yield wait_for(lambda: server.ready()[0])
        count = 300_000
        envelope = publish.envelope(publish.node_event("nobody", "g", "e", "n", "RUNNING"))
        channel = LAYOUT.classic_exec("nobody", "g", "e")
        command = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            len(channel), channel.encode(), len(envelope), envelope)
        flood = subprocess.Popen(["redis-cli", "-p", str(redis.port), "--pipe"], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        flood.stdin.write(command * count)  # type: ignore[union-attr]
        flood.stdin.close()  # type: ignore[union-attr]
        yield wait_for(lambda: server.stats.events_ignored == count or server.stats.bus_reconnects, timeout=60)
        flood.wait(10)
        self.assertEqual((server.stats.bus_reconnects, server.stats.events_ignored), (0, count))
        self.assertTrue(server.ready()[0])

    @inlineCallbacks
    def test_stop_abandons_an_attempt_in_flight(self) -> Any:
        """Stopping while the handshake waits closes that connection."""
        silent = SilentServer(self)
        accepted, lost = silent.accepted, silent.lost
        server = start_server(self, bus_settings(silent.port))
        yield wait_for(lambda: accepted)
        self.assertEqual(server.bus.state, "connecting")
        yield server.stopService()
        yield lost
        self.assertEqual(server.ready(), (False, "shutting down"))


class Schedule(TestCase):
    """Backoff and probes on an injected clock; connections stay real."""

    def make_bus(self, port: int, jitter: float = 0.0, **settings: Any) -> tuple[RedisBus, Clock]:
        clock = Clock()
        stats = Stats()
        bus = RedisBus(bus_settings(port, **settings), Router(Hub(), stats, LAYOUT), reactor, stats,
                       clock=clock, jitter=lambda: jitter)
        bus.startService()
        self.addCleanup(bus.stopService)
        return bus, clock

    def next_retry(self, bus: RedisBus, clock: Clock) -> float:
        return round(bus._timers["retry"].getTime() - clock.seconds(), 6)

    @inlineCallbacks
    def failed_attempt(self, bus: RedisBus, clock: Clock, advance: float) -> Any:
        failures = bus._failures
        clock.advance(advance + 0.001)
        yield wait_for(lambda: bus._failures == failures + 1)

    @inlineCallbacks
    def test_backoff_doubles_to_the_cap_then_a_probe_resumes_at_once(self) -> Any:
        port = free_port()
        bus, clock = self.make_bus(port)
        yield wait_for(lambda: bus.state == "waiting")
        delays = [self.next_retry(bus, clock)]
        for _ in range(5):
            yield self.failed_attempt(bus, clock, delays[-1])
            delays.append(self.next_retry(bus, clock))
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, BACKOFF_MAX, BACKOFF_MAX])
        # a probe runs every second while the next attempt is further away
        self.assertEqual(bus._timers["probe"].getTime() - clock.seconds(), 1.0)
        clock.advance(1.0)
        yield wait_for(lambda: bus._probing is None and "probe" in bus._timers)
        self.assertEqual(bus._failures, 6)  # a probe is not an attempt
        redis = redis_server(self, port=port)
        clock.advance(1.0)  # 2 s into an 8 s wait
        yield wait_for(lambda: bus.ready()[0])
        self.assertEqual(len(redis_clients(redis)), 1)
        self.assertNotIn("retry", bus._timers)

    @inlineCallbacks
    def test_jitter_shortens_delays(self) -> Any:
        bus, clock = self.make_bus(free_port(), jitter=0.999999)
        yield wait_for(lambda: bus.state == "waiting")
        first = self.next_retry(bus, clock)
        yield self.failed_attempt(bus, clock, first)
        self.assertAlmostEqual(first, 0.375, places=4)
        self.assertAlmostEqual(self.next_retry(bus, clock), 0.75, places=4)

    @inlineCallbacks
    def test_refusal_gets_plain_backoff_without_probes(self) -> Any:
        """Redis answers but refuses: probing would only hammer it."""
        redis = redis_server(self, extra=("--requirepass", "pw"))
        bus, clock = self.make_bus(redis.port)
        yield wait_for(lambda: bus.state == "waiting")
        for expected in (0.5, 1.0, 2.0):
            self.assertEqual(self.next_retry(bus, clock), expected)
            self.assertNotIn("probe", bus._timers)
            yield self.failed_attempt(bus, clock, expected)
        self.assertEqual(self.next_retry(bus, clock), 4.0)
        self.assertIn("authentication refused", bus.ready()[1])

    @inlineCallbacks
    def test_subscribed_resets_backoff_and_stop_cancels_every_timer(self) -> Any:
        port = free_port()
        bus, clock = self.make_bus(port)
        yield wait_for(lambda: bus.state == "waiting")
        yield self.failed_attempt(bus, clock, 0.5)
        redis = redis_server(self, port=port)
        clock.advance(1.0)
        yield wait_for(lambda: bus.ready()[0])
        self.assertEqual([round(c.getTime() - clock.seconds(), 6) for c in clock.getDelayedCalls()], [15.0])  # the PING
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        yield wait_for(lambda: bus.state == "waiting")
        self.assertEqual(self.next_retry(bus, clock), 0.5)
        yield bus.stopService()
        self.assertEqual([c for c in clock.getDelayedCalls() if c.active()], [])
        self.assertEqual(bus.ready(), (False, "redis bus stopped"))

    @inlineCallbacks
    def test_a_connection_arriving_after_stop_is_closed(self) -> Any:
        redis = redis_server(self)
        stats = Stats()
        handed: list[Any] = []

        def slow_connector(proto: Any) -> Deferred[Any]:
            handed.append(proto)
            return Deferred()  # not cancellable: as if the connect raced the stop

        bus = RedisBus(bus_settings(redis.port), Router(Hub(), stats, LAYOUT), reactor, stats,
                       connector=slow_connector)
        bus.startService()
        yield bus.stopService()
        [proto] = handed
        yield resp_connect(reactor, "127.0.0.1", redis.port, protocol=proto)
        yield proto.closed()
        yield wait_for(lambda: [c for c in redis_clients(redis, "normal") if b"cmd=client|list" not in c] == [])
        self.assertEqual(redis_clients(redis), [])


class ScaleOut(TestCase):
    @inlineCallbacks
    def test_two_servers_on_one_redis(self) -> Any:
        """Each server delivers to its own sockets: every event once per
        subscribed socket, none lost, none duplicated."""
        redis = redis_server(self)
        one = yield ready_server(self, redis)
        two = yield ready_server(self, redis)
        self.assertEqual(len(redis_clients(redis)), 2)
        pub = publisher_for(self, redis)
        a_exec = yield connect(one.port, token="t", test=self)
        a_graph = yield connect(one.port, token="t", test=self)
        b_exec = yield connect(two.port, token="t", test=self)
        b_both = yield connect(two.port, token="t", test=self)
        for client in (a_exec, b_exec, b_both):
            yield client.request(sub_exec("x1"))
        for client in (a_graph, b_both):
            yield client.request(sub_graph("g1"))
        rounds = 40
        for i in range(rounds):
            yield publish.publish_event(pub, LAYOUT, publish.node_event(U, "g1", "x1", f"n{i}", "RUNNING"))
            yield publish.publish_event(pub, LAYOUT, publish.graph_event(U, "g1", "x1", "RUNNING", step=i))
            yield publish.publish_event(pub, LAYOUT, publish.node_event(U, "g-other", "nobody", f"z{i}", "RUNNING"))
        expected = {a_exec: 2 * rounds, b_exec: 2 * rounds, a_graph: rounds, b_both: 3 * rounds}
        subscribed = {a_exec: 1, b_exec: 1, a_graph: 1, b_both: 2}
        yield wait_for(lambda: all(len(c.messages) - subscribed[c] >= n for c, n in expected.items())
                       and one.stats.events_received == two.stats.events_received == 3 * rounds)
        for client, n in expected.items():
            frames = [json.loads(m) for m in client.messages[subscribed[client]:]]
            self.assertEqual(len(frames), n)
            keys = [(f["method"], f["channel"], f["data"].get("node_exec_id", f["data"].get("step"))) for f in frames]
            self.assertEqual(len(set(keys)), n)  # none twice
        for server in (one, two):
            self.assertEqual(server.stats.events_received, 3 * rounds)
            self.assertEqual(server.stats.events_ignored, rounds)

    def test_demo_publishes_through_redis(self) -> None:
        server = build(bus_settings(free_port()), demo=True, reactor=reactor)
        [demo] = [s for s in server if s.name == "demo"]
        self.assertEqual(demo.producer(), (server.bus.publisher, False))
        self.assertIsInstance(server.bus.publisher, RedisPublisher)


class TLS(TestCase):
    """rediss:// verified against the name in the URL with service_identity."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="redis-tls-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = write_pki(self.dir)

    def start_tls_redis(self) -> int:
        port = free_port()
        process = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--tls-cert-file", os.path.join(self.dir, "server.pem"),
             "--tls-key-file", os.path.join(self.dir, "server.key"), "--tls-ca-cert-file", self.ca,
             "--tls-auth-clients", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (process.kill(), process.wait(5)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.skipTest("redis-server was built without TLS")
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return port
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("TLS redis-server did not start")

    @inlineCallbacks
    def test_rediss_url_verified(self) -> Any:
        port = self.start_tls_redis()
        settings = make_settings(event_bus="redis", redis_url=f"rediss://localhost:{port}", redis_tls_ca_file=self.ca)
        server = start_server(self, settings)
        yield wait_for(lambda: server.ready()[0])
        self.assertIn(f"rediss://localhost:{port}/0", server.bus.describe())
        client = yield connect(server.port, token="t", test=self)
        yield client.request(sub_exec("tls"))
        event = publish.node_event(U, "g", "tls", "n", "RUNNING")
        yield publish.publish_event(server.bus.publisher, LAYOUT, event)
        self.assertEqual((yield client.message(1)), pushed("node_execution_event", f"{U}|graph_exec#tls", event_bytes(event)))

    @inlineCallbacks
    def test_wrong_name_or_authority_refused(self) -> Any:
        port = self.start_tls_redis()
        other_ca = write_pki(tempfile.mkdtemp(prefix="redis-tls-other-", dir=self.dir))
        unknown = start_server(self, make_settings(event_bus="redis", redis_url=f"rediss://localhost:{port}",
                                                   redis_tls_ca_file=other_ca))
        wrong_name = start_server(self, make_settings(event_bus="redis", redis_host="127.0.0.1", redis_port=port,
                                                      redis_tls=True, redis_tls_ca_file=self.ca))
        yield wait_for(lambda: unknown.bus.state == "waiting" and wrong_name.bus.state == "waiting")
        self.assertIn("certificate verify failed", unknown.ready()[1])
        self.assertIn("redis bus unavailable", wrong_name.ready()[1])
        self.assertFalse(wrong_name.ready()[0])


def write_pki(directory: str) -> str:
    """A CA and a server certificate for localhost, signed by it; returns
    the CA file."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("test CA", ca_key, "test CA", ca_key, True)
    server_cert = cert("localhost", server_key, "test CA", ca_key, False)
    pem = serialization.Encoding.PEM
    files = {
        "ca.pem": ca_cert.public_bytes(pem),
        "server.pem": server_cert.public_bytes(pem),
        "server.key": server_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()),
    }
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(data)
    return os.path.join(directory, "ca.pem")
