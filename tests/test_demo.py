"""The simulated executor (--demo) publishes realistic runs into the
embedded bus, and a subscribed socket sees every step in order."""

import json

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from autogpt_ws.producing.demo import DEMO_GRAPH, NODES, DemoExecutor
from autogpt_ws.running.tap import Options, build
from tests.helpers import U, connect, start_server


class DemoRun(TestCase):
    @inlineCallbacks
    def test_run_reaches_a_subscribed_socket_in_order(self) -> None:
        server = start_server(self)
        demo = DemoExecutor(server.bus.producer, server.layout, reactor, step=0.001)
        client = yield connect(server.port, test=self)
        yield client.request('{"method":"subscribe_graph_execution","data":{"graph_exec_id":"run-1"}}')
        yield demo.run("run-1")
        expected = 2 + 3 * len(NODES) + 1 + 1  # QUEUED, RUNNING, node steps, COMPLETED, notification
        yield client.message(expected)
        frames = [json.loads(m) for m in client.messages[1:]]
        graph = [f["data"]["status"] for f in frames if f["method"] == "graph_execution_event"]
        self.assertEqual(graph, ["QUEUED", "RUNNING", "COMPLETED"])
        nodes = [(f["data"]["node_id"], f["data"]["status"]) for f in frames if f["method"] == "node_execution_event"]
        self.assertEqual(nodes, [(n[0], s) for n in NODES for s in ("QUEUED", "RUNNING", "COMPLETED")])
        self.assertEqual(frames[-1]["method"], "notification")
        self.assertEqual(frames[-1]["data"]["graph_exec_id"], "run-1")
        for frame in frames[:-1]:
            self.assertEqual(frame["channel"], f"{U}|graph_exec#run-1")
            self.assertEqual(frame["data"]["graph_id"], DEMO_GRAPH)

    def test_demo_flag_adds_the_executor(self) -> None:
        options = Options()
        options.parseOptions(["--demo", "--set", "enable_auth=false", "--port", "0"])
        server = build(options.settings, demo=True)
        self.assertIsInstance(server.getServiceNamed("demo"), DemoExecutor)
