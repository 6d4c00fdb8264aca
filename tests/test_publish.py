"""The publishing side: RedisPublisher and ``autogpt-ws publish``, against a
real redis-server on a free port, in process and as a real subprocess."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from autogpt_ws.bus.redis_client import Connection, RedisAddress, RedisPublisher
from autogpt_ws.bus.resp import connect as resp_connect, handshake
from autogpt_ws.config import load
from autogpt_ws.core.channels import Layout
from autogpt_ws.producing import publish_cli
from tests.helpers import PYTHON, RedisServer, SilentServer, U, connect, free_port, redis_server, start_server, wait_for

LAYOUT = Layout()
NODE_KEYS = ["user_id", "graph_id", "graph_version", "graph_exec_id", "node_exec_id", "node_id", "block_id", "status",
             "input_data", "output_data", "add_time", "queue_time", "start_time", "end_time", "event_type"]
GRAPH_KEYS = ["id", "user_id", "graph_id", "graph_version", "inputs", "credential_inputs", "nodes_input_masks",
              "preset_id", "status", "started_at", "ended_at", "is_shared", "share_token", "is_dry_run", "stats",
              "outputs", "event_type"]


class Subscriber:
    """A raw subscriber connection collecting (kind, channel, data)."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, bytes]] = []
        self.conn = Connection(lambda channel, data: self.received.append((channel, data)))

    @classmethod
    @inlineCallbacks
    def start(cls, test: TestCase, redis: RedisServer, verb: str, channels: list[str], password: str = "") -> Any:
        sub = cls()
        yield resp_connect(reactor, "127.0.0.1", redis.port, protocol=sub.conn)
        test.addCleanup(sub.conn.abandon)
        yield handshake(sub.conn, password=password)
        yield sub.conn.subscribe(verb, channels)
        return sub

    def wait(self, count: int) -> Deferred[Any]:
        return wait_for(lambda: len(self.received) >= count)


def publisher(test: TestCase, port: int, **kwargs: Any) -> RedisPublisher:
    pub = RedisPublisher(RedisAddress(host="127.0.0.1", port=port, **kwargs), reactor)
    test.addCleanup(pub.close)
    return pub


class Publisher(TestCase):
    @inlineCallbacks
    def test_publish_fires_with_receivers_and_sends_the_bytes(self) -> Any:
        redis = redis_server(self)
        sub = yield Subscriber.start(self, redis, "SUBSCRIBE", ["ch"])
        pub = publisher(self, redis.port)
        data = b'{"payload":{"x":"\xc3\xa9"}}\x00\xff'
        self.assertEqual((yield pub.publish("ch", data)), 1)
        self.assertEqual((yield pub.publish("nobody", data)), 0)
        yield sub.wait(1)
        self.assertEqual(sub.received, [(b"ch", data)])

    @inlineCallbacks
    def test_order_kept_for_publishes_made_while_connecting(self) -> Any:
        redis = redis_server(self)
        sub = yield Subscriber.start(self, redis, "SUBSCRIBE", ["ch"])
        pub = publisher(self, redis.port)
        counts = yield gatherResults([pub.publish("ch", b"%d" % i) for i in range(200)])
        self.assertEqual(counts, [1] * 200)
        yield sub.wait(200)
        self.assertEqual([d for _, d in sub.received], [b"%d" % i for i in range(200)])

    @inlineCallbacks
    def test_reconnects_after_the_connection_is_lost(self) -> Any:
        redis = redis_server(self)
        sub = yield Subscriber.start(self, redis, "SUBSCRIBE", ["ch"])
        pub = publisher(self, redis.port)
        yield pub.publish("ch", b"one")
        self.assertIn(b":1\r\n", redis.command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
        yield wait_for(lambda: pub._conn is None)
        self.assertEqual((yield pub.publish("ch", b"two")), 1)
        yield sub.wait(2)
        self.assertEqual([d for _, d in sub.received], [b"one", b"two"])

    @inlineCallbacks
    def test_redis_down_fails_then_recovers(self) -> Any:
        port = free_port()
        pub = publisher(self, port)
        failure = yield self.assertFailure(pub.publish("ch", b"x"), ConnectionError)
        self.assertIn(f"cannot publish to redis://127.0.0.1:{port}/0: connection refused", str(failure))
        redis_server(self, port=port)
        self.assertEqual((yield pub.publish("ch", b"x")), 0)

    @inlineCallbacks
    def test_sharded_uses_spublish(self) -> Any:
        redis = redis_server(self)
        channel = LAYOUT.sharded_all(U, "g")
        sub = yield Subscriber.start(self, redis, "SSUBSCRIBE", [channel])
        pub = RedisPublisher(RedisAddress(host="127.0.0.1", port=redis.port), reactor, sharded=True)
        self.addCleanup(pub.close)
        self.assertEqual((yield pub.publish(channel, b"s")), 1)
        yield sub.wait(1)
        self.assertEqual(sub.received, [(channel.encode(), b"s")])

    @inlineCallbacks
    def test_password_and_db(self) -> Any:
        redis = redis_server(self, extra=("--requirepass", "pw"))
        sub = yield Subscriber.start(self, redis, "SUBSCRIBE", ["ch"], password="pw")
        good = publisher(self, redis.port, password="pw", db=3)
        self.assertEqual((yield good.publish("ch", b"ok")), 1)
        bad = publisher(self, redis.port, password="wrong")
        failure = yield self.assertFailure(bad.publish("ch", b"no"), ConnectionError)
        self.assertIn("WRONGPASS", str(failure))
        self.assertNotIn("wrong", repr(bad.address) + str(bad.address))
        yield sub.wait(1)
        self.assertEqual(len(sub.received), 1)

    @inlineCallbacks
    def test_close_while_connecting(self) -> Any:
        silent = SilentServer(self)
        accepted, lost = silent.accepted, silent.lost
        pub = RedisPublisher(RedisAddress(host="127.0.0.1", port=silent.port), reactor)
        waiting = pub.publish("ch", b"x")
        yield wait_for(lambda: accepted)
        yield pub.close()
        yield self.assertFailure(waiting, ConnectionError)
        yield lost


def parse(argv: list[str]) -> publish_cli.PublishOptions:
    options = publish_cli.PublishOptions()
    options.parseOptions(argv)
    return options


class CommandInProcess(TestCase):
    """The forms of ``autogpt-ws publish``: what lands on Redis."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.redis = redis_server(self)
        self.sub = yield Subscriber.start(self, self.redis, "PSUBSCRIBE", ["*"])

    @inlineCallbacks
    def publish(self, *argv: str) -> Any:
        options = parse(["--redis-url", f"redis://127.0.0.1:{self.redis.port}", *argv])
        settings = load(None, env={}, overrides=options.overrides())
        out, err = io.StringIO(), io.StringIO()
        status = yield publish_cli.run(reactor, options, settings, out, err)
        self.assertEqual((status, err.getvalue()), (0, ""))
        return out.getvalue().splitlines()

    def envelope(self, index: int) -> tuple[str, dict[str, Any]]:
        channel, data = self.received[index]
        return channel.decode(), json.loads(data)

    @property
    def received(self) -> list[tuple[bytes, bytes]]:
        return self.sub.received

    @inlineCallbacks
    def test_node(self) -> Any:
        lines = yield self.publish("node", "--user", "u1", "--graph", "g1", "--exec", "e1", "--node-exec", "ne1",
                                   "--status", "COMPLETED", "--output", '{"result":["ok"]}')
        self.assertEqual(lines, ["execution_event/u1/g1/e1 1"])
        yield self.sub.wait(1)
        channel, envelope = self.envelope(0)
        self.assertEqual(channel, "execution_event/u1/g1/e1")
        self.assertEqual(list(envelope), ["payload"])
        event = envelope["payload"]
        self.assertEqual(list(event), NODE_KEYS)
        self.assertEqual((event["node_exec_id"], event["status"], event["output_data"], event["event_type"]),
                         ("ne1", "COMPLETED", {"result": ["ok"]}, "node_execution_update"))
        self.assertNotIn(b" ", self.received[0][1])  # compact, as the executors write it

    @inlineCallbacks
    def test_graph_sharded(self) -> Any:
        lines = yield self.publish("--sharded", "graph", "--user", "u1", "--graph", "g1", "--exec", "e1",
                                   "--status", "FAILED", "--stats", '{"cost":3}')
        # PSUBSCRIBE does not see SPUBLISH: the receiver count says so
        self.assertEqual(lines, ["execution_event/{u1/g1}/exec/e1 0", "execution_event/{u1/g1}/all 0"])
        sub = yield Subscriber.start(self, self.redis, "SSUBSCRIBE", ["execution_event/{u1/g1}/all"])
        yield self.publish("graph", "--sharded", "--user", "u1", "--graph", "g1", "--exec", "e1")
        yield sub.wait(1)
        event = json.loads(sub.received[0][1])["payload"]
        self.assertEqual(list(event), GRAPH_KEYS)
        self.assertEqual((event["id"], event["event_type"]), ("e1", "graph_execution_update"))

    @inlineCallbacks
    def test_notification(self) -> Any:
        lines = yield self.publish("notification", "--user", "u1", "--type", "agent_run", "--event", "hi",
                                   "--extra", '{"graph_exec_id":"e1"}')
        self.assertEqual(lines, ["notification_event/u1 1"])
        yield self.sub.wait(1)
        self.assertEqual(self.envelope(0), ("notification_event/u1", {"payload": {
            "user_id": "u1", "payload": {"type": "agent_run", "event": "hi", "graph_exec_id": "e1"}}}))

    @inlineCallbacks
    def test_raw(self) -> Any:
        yield self.publish("raw", "custom/channel", '{"payload": {"as": "given"} }')
        yield self.publish("raw", "--no-check", "custom/channel", "not json")
        yield self.sub.wait(2)
        self.assertEqual(self.received,
                         [(b"custom/channel", b'{"payload": {"as": "given"} }'), (b"custom/channel", b"not json")])

    @inlineCallbacks
    def test_whole_run(self) -> Any:
        lines = yield self.publish("run", "--user", "u1", "--exec", "run-1", "--step", "0")
        self.assertEqual(len(lines), 13)
        yield self.sub.wait(13)
        events = [self.envelope(i) for i in range(13)]
        graph = [e["payload"]["status"] for c, e in events if e["payload"].get("event_type") == "graph_execution_update"]
        nodes = [e["payload"]["status"] for c, e in events if e["payload"].get("event_type") == "node_execution_update"]
        self.assertEqual(graph, ["QUEUED", "RUNNING", "COMPLETED"])
        self.assertEqual(nodes, ["QUEUED", "RUNNING", "COMPLETED"] * 3)
        self.assertEqual({c for c, _ in events[:-1]}, {"execution_event/u1/demo-graph/run-1"})
        self.assertEqual(events[-1][0], "notification_event/u1")

    def test_usage_errors(self) -> None:
        from twisted.python.usage import UsageError

        for argv in ([], ["node", "--status", "DONE"], ["node", "--input", "[1]"], ["raw", "only-channel"],
                     ["raw", "ch", "{bad"], ["run", "--step", "soon"], ["bogus"],
                     # ids make channel names: none may be empty or hold a delimiter
                     ["notification", "--user", ""], ["notification", "--user", "a/b"], ["run", "--user", ""],
                     ["node", "--graph", ""], ["graph", "--exec", "e/1"], ["graph", "--user", "{u}"]):
            with self.assertRaises(UsageError, msg=argv):
                options = parse(argv)
                if argv[:1] == ["node"]:
                    options.subOptions.event()


class CommandSubprocess(TestCase):
    """``autogpt-ws publish`` as a real process, settings from env and options."""

    def setUp(self) -> None:
        self.cwd = tempfile.mkdtemp(prefix="publish-cli-")  # no config.yaml here
        self.addCleanup(shutil.rmtree, self.cwd, True)

    def run_command(self, *argv: str, **env: str) -> Deferred[tuple[bytes, bytes, int]]:
        script = os.path.join(os.path.dirname(PYTHON), "autogpt-ws")
        if os.path.exists(script):
            executable, args = script, ["publish", *argv]
        else:
            executable, args = PYTHON, ["-c", "import sys; from autogpt_ws.running.cli import main; sys.exit(main())",
                                        "publish", *argv]
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("REDIS_", "EVENT_BUS", "AUTOGPT_WS", "EXECUTION_EVENT", "NOTIFICATION_EVENT"))}
        return getProcessOutputAndValue(executable, args, env={**clean, **env}, path=self.cwd, reactor=reactor)

    @inlineCallbacks
    def test_publish_reaches_a_socket(self) -> Any:
        redis = redis_server(self)
        server = start_server(self, event_bus="redis", redis_host="127.0.0.1", redis_port=redis.port)
        yield wait_for(lambda: server.ready()[0])
        client = yield connect(server.port, token="t", test=self)
        yield client.request('{"method":"subscribe_graph_execution","data":{"graph_exec_id":"cli-1"}}')
        out, err, code = yield self.run_command("node", "--graph", "g", "--exec", "cli-1", "--status", "COMPLETED",
                                                "--redis-url", f"redis://127.0.0.1:{redis.port}")
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(out, f"execution_event/{U}/g/cli-1 1\n".encode())
        frame = json.loads((yield client.message(1)))
        self.assertEqual((frame["method"], frame["data"]["status"]), ("node_execution_event", "COMPLETED"))
        # settings from the environment, and --set over the environment
        dead = free_port()
        out, err, code = yield self.run_command("notification", "--event", "from env", "--set", f"redis_port={redis.port}",
                                                REDIS_HOST="127.0.0.1", REDIS_PORT=str(dead))
        self.assertEqual((code, err, out), (0, b"", f"notification_event/{U} 1\n".encode()))
        frame = json.loads((yield client.message(2)))
        self.assertEqual(frame["data"]["event"], "from env")

    @inlineCallbacks
    def test_exit_status(self) -> Any:
        dead = f"redis://127.0.0.1:{free_port()}"
        for argv, status, text in (
            (["node", "--redis-url", dead], 1, b"connection refused"),
            (["run", "--step", "0", "--redis-url", dead], 1, b"connection refused"),
            (["node", "--status", "DONE"], 2, b"--status must be one of"),
            ([], 2, b"name what to publish"),
            (["node", "--set", "redis_port=abc"], 2, b"configuration error: redis_port"),
            (["notification", "--user", "", "--redis-url", dead], 2, b"--user must be a non-empty id"),
        ):
            out, err, code = yield self.run_command(*argv)
            self.assertEqual(code, status, (argv, out, err))
            self.assertIn(text, err)
            self.assertNotIn(b"Traceback", err)
            self.assertNotIn(b"Unhandled", err)
