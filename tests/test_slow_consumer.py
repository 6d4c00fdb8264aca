"""Slow consumers (issue 5, point 1): the socket is its transport's push
producer; a client that stops reading is closed 1013 once its unsent output
passes ``max_send_buffer``, the server's buffer for it stays bounded, and a
reading client on the same channel receives every event."""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from autogpt_ws import publish
from autogpt_ws.protocol import ServerProtocol
from autogpt_ws.service import WebsocketServer
from tests.helpers import U, RawClient, raw_connect, server_side, sleep, start_server, tcp_buffered, wait_for

SUBSCRIBE = '{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}'
PAD = "x" * 4000  # each event frame is a little over 4 KiB


def envelope(seq: int) -> bytes:
    event = publish.node_event(U, "g1", "e1", f"ne{seq}", "RUNNING", output_data={"out": [PAD]})
    return publish.envelope(event)


class Publisher:
    """Publishes numbered events on channel ``U/g1/e1`` of a server's bus."""

    def __init__(self, server: WebsocketServer) -> None:
        self.server = server
        self.channel = server.layout.classic_exec(U, "g1", "e1")
        self.sent = 0

    def batch(self, count: int) -> None:
        for _ in range(count):
            self.server.bus.publish(self.channel, envelope(self.sent))  # type: ignore[attr-defined]
            self.sent += 1


@inlineCallbacks
def subscribed(port: int, test: TestCase, **kwargs: Any) -> Any:
    client = yield raw_connect(port, test=test, **kwargs)
    reply = yield client.request(SUBSCRIBE)
    test.assertIn(b'"success":true', reply)
    return client


class Producer(TestCase):
    @inlineCallbacks
    def test_socket_replaces_http_channel_as_producer(self) -> None:
        server = start_server(self)
        client = yield raw_connect(server.port, test=self)
        proto = server_side(server, client)
        self.assertIsInstance(proto, ServerProtocol)
        self.assertIs(proto.transport.producer, proto)
        self.assertTrue(proto.transport.streamingProducer)

    @inlineCallbacks
    def test_paused_while_client_does_not_read_and_resumed_after(self) -> None:
        server = start_server(self)
        publisher = Publisher(server)
        client = yield subscribed(server.port, self, rcvbuf=4096)
        proto = server_side(server, client)
        client.transport.pauseProducing()  # stop reading
        deadline = time.monotonic() + 20
        while not proto._paused:
            self.assertLess(time.monotonic(), deadline, "the transport never paused its producer")
            publisher.batch(4)
            yield sleep(0.005)
        self.assertGreater(tcp_buffered(proto.transport), server.factory.transport_buffer)
        client.transport.resumeProducing()
        yield wait_for(lambda: not proto._paused, timeout=20)
        yield wait_for(lambda: len(client.messages) == publisher.sent + 1, timeout=20)
        self.assertEqual(server.stats.slow_consumer_closes, 0)
        self.assertIn(proto, server.factory.sockets)


class SlowConsumer(TestCase):
    @inlineCallbacks
    def flood(self, bound: int, reader: bool) -> Any:
        """Subscribe a client that stops reading (and maybe one that reads),
        publish events until the slow one has been gone 0.5 s and at least
        2 s have passed; sample the server's buffer for the slow socket
        after each batch.  Returns (server, publisher, reader, slow socket,
        peak unsent bytes, whether it was seen paused)."""
        server = start_server(self, max_send_buffer=bound)
        publisher = Publisher(server)
        reading = (yield subscribed(server.port, self)) if reader else None
        slow: RawClient = yield subscribed(server.port, self, rcvbuf=4096)
        proto = server_side(server, slow)
        self.assertEqual(proto.transport.bufferSize, min(bound, server.factory.transport_buffer))
        slow.transport.pauseProducing()  # the slow client stops reading
        peak = 0
        paused_seen = False
        started = time.monotonic()
        closed_at: float | None = None
        while True:
            now = time.monotonic()
            if closed_at is not None and now - closed_at > 0.5 and now - started > 2:
                break
            self.assertLess(now - started, 30, "the slow consumer was never closed")
            publisher.batch(4)
            if proto in server.factory.sockets:
                paused_seen = paused_seen or proto._paused
                peak = max(peak, tcp_buffered(proto.transport))
            elif closed_at is None:
                closed_at = now
            yield sleep(0.005)
        self.assertEqual(server.stats.slow_consumer_closes, 1)
        self.assertEqual(server.stats.sockets_closed["1013"], 1)
        self.assertEqual((proto.localCloseCode, proto.localCloseReason), (1013, b"slow consumer"))
        self.assertTrue(paused_seen, "the slow socket's transport never paused it")
        frame = len(envelope(0)) + 200  # the envelope plus push framing, generously
        self.assertGreater(peak, bound // 2, "the flood never filled the server's buffer")
        self.assertLessEqual(peak, bound + frame + 64)  # the bound, one frame, a close frame
        return server, publisher, reading

    @inlineCallbacks
    def test_non_reading_client_is_closed_and_a_reading_one_gets_everything(self) -> None:
        server, publisher, reader = yield self.flood(256 * 1024, reader=True)
        # the reading client got every event, in order, and is still open
        yield wait_for(lambda: len(reader.messages) == publisher.sent + 1, timeout=20)
        seqs = [json.loads(m)["data"]["node_exec_id"] for m in reader.messages[1:]]
        self.assertEqual(seqs, [f"ne{i}" for i in range(publisher.sent)])
        self.assertIsNone(reader.close_code)
        reply = yield reader.request('{"method":"heartbeat","data":"ping","success":true}')
        self.assertEqual(reply, b'{"method":"heartbeat","data":"pong","success":true}')

    @inlineCallbacks
    def test_bound_below_the_transport_buffer(self) -> None:
        yield self.flood(24 * 1024, reader=False)
