"""What an open socket keeps: Autobahn's per-connection copies of the
factory options and its handshake state are not held per socket.  What a
closed one leaves: nothing, even before the garbage collector runs."""

import gc
import weakref
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from autogpt_ws.sockets.factory import deflate_bound
from autogpt_ws.sockets.protocol import HANDSHAKE_ONLY, SendQueue
from tests.helpers import connect, sleep, start_server, wait_for


class IdleSocketState(TestCase):
    @inlineCallbacks
    def test_open_socket_holds_no_handshake_state_nor_option_copies(self) -> None:
        server = start_server(self, max_inbound_frame=1024)
        client = yield connect(server.port, test=self)
        yield client.request('{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}')
        (proto,) = server.factory.sockets
        held = vars(proto)
        for name in HANDSHAKE_ONLY + tuple(proto.CONFIG_ATTRS):
            self.assertNotIn(name, held)
        # the options still apply, from the class
        self.assertEqual(proto.maxFramePayloadSize, deflate_bound(1024))
        self.assertIsInstance(proto.send_queue, SendQueue)
        # and the socket still works after the handshake state is gone
        reply = yield client.request('{"method":"heartbeat","data":"ping","success":true}')
        self.assertEqual(reply, b'{"method":"heartbeat","data":"pong","success":true}')

    def test_send_queue_is_a_fifo(self) -> None:
        queue = SendQueue()
        queue.append(1)
        queue.append(2)
        self.assertEqual((queue.popleft(), queue.popleft(), len(queue)), (1, 2, 0))


class ClosedSocketFreed(TestCase):
    @inlineCallbacks
    def test_closed_socket_is_freed_without_the_garbage_collector(self) -> Any:
        server = start_server(self)
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        for close in ("handshake", "reset"):
            client = yield connect(server.port, test=self)
            yield client.request('{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}')
            (proto,) = server.factory.sockets
            gone = weakref.ref(proto)
            del proto
            if close == "handshake":
                client.sendClose(1000)
            else:
                client.dropConnection(abort=True)
            yield wait_for(lambda: not server.factory.sockets)
            yield sleep(0.05)  # the reactor lets go of the transport
            self.assertIsNone(gone(), f"closed by {close}: still referenced, only a collection would free it")
