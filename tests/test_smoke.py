from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from autogpt_ws.producing import publish
from tests.helpers import U, connect, start_server


class Smoke(TestCase):
    @inlineCallbacks
    def test_subscribe_and_receive(self):
        server = start_server(self)
        client = yield connect(server.port, token="ignored", test=self)
        reply = yield client.request('{"method":"heartbeat","data":"ping","success":true}')
        self.assertEqual(reply, b'{"method":"heartbeat","data":"pong","success":true}')
        reply = yield client.request('{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}')
        self.assertEqual(reply, b'{"method":"subscribe_graph_execution","data":null,"success":true,"channel":"%s|graph_exec#e1","error":null}' % U.encode())
        event = publish.node_event(U, "g1", "e1", "ne1", "RUNNING")
        yield publish.publish_event(server.bus, server.layout, event)
        pushed = yield client.message(2)
        self.assertTrue(pushed.startswith(b'{"method":"node_execution_event","data":{"user_id"'), pushed)
