"""Slow consumers (issue 5, point 1; issue 14, points 1 and 8): the socket
is its transport's push producer; a client that stops reading is closed
1013 once its unsent output (every frame, pongs included) passes
``max_send_buffer``, the server's buffer for it stays bounded, and a
reading client on the same channel receives every event.  A client that
reads, but too slowly, gets the 1013 close frame after what it was
already being sent (the rest dropped), then the end of the connection."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from autogpt_ws.producing import publish
from autogpt_ws.running.service import WebsocketServer
from autogpt_ws.sockets.protocol import ServerProtocol
from tests.helpers import (RawClient, U, raw_connect, raw_upgrade_request, server_side, sleep, start_server, wait_for,
                           ws_client_frame)

SUBSCRIBE = '{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}'
PAD = "x" * 4000  # each event frame is a little over 4 KiB


def envelope(seq: int, pad: str = PAD) -> bytes:
    event = publish.node_event(U, "g1", "e1", f"ne{seq}", "RUNNING", output_data={"out": [pad]})
    return publish.envelope(event)


class Publisher:
    """Publishes numbered events on channel ``U/g1/e1`` of a server's bus."""

    def __init__(self, server: WebsocketServer, pad: str = PAD) -> None:
        self.server = server
        self.channel = server.layout.classic_exec(U, "g1", "e1")
        self.pad = pad
        self.sent = 0

    def batch(self, count: int) -> None:
        for _ in range(count):
            self.server.bus.publish(self.channel, envelope(self.sent, self.pad))  # type: ignore[attr-defined]
            self.sent += 1


def small_kernel_buffer(proto: ServerProtocol) -> None:
    """Shrink the server socket's kernel send buffer.  On loopback Linux
    grows it to 4 MiB, which a slow reader would need minutes to drain
    before anything the server does reaches it; across a network it holds
    about a bandwidth-delay product."""
    proto.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


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
        self.assertGreater(proto.unsent(), 0)
        client.transport.resumeProducing()
        yield wait_for(lambda: not proto._paused, timeout=20)
        yield wait_for(lambda: len(client.messages) == publisher.sent + 1, timeout=20)
        self.assertEqual(server.stats.slow_consumer_closes, 0)
        self.assertIn(proto, server.factory.sockets)


class SlowConsumer(TestCase):
    @inlineCallbacks
    def flood(self, bound: int, reader: bool, batch: int = 4) -> Any:
        """Subscribe a client that stops reading (and maybe one that reads),
        publish events until the slow one has been gone 0.5 s and at least
        2 s have passed; sample the server's buffer for the slow socket
        after each batch.  Returns (server, publisher, reader)."""
        server = start_server(self, max_send_buffer=bound)
        publisher = Publisher(server)
        reading = (yield subscribed(server.port, self)) if reader else None
        slow: RawClient = yield subscribed(server.port, self, rcvbuf=4096)
        proto = server_side(server, slow)
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
            publisher.batch(batch)
            if proto in server.factory.sockets:
                paused_seen = paused_seen or proto._paused
                peak = max(peak, proto.unsent())
            elif closed_at is None:
                closed_at = now
            yield sleep(0.005)
        self.assertEqual(server.stats.slow_consumer_closes, 1)
        self.assertEqual(server.stats.sockets_closed["1013"], 1)
        self.assertEqual((proto.localCloseCode, proto.localCloseReason), (1013, b"slow consumer"))
        self.assertTrue(paused_seen, "the slow socket's transport never paused it")
        frame = len(envelope(0)) + 200  # the envelope plus push framing, generously
        self.assertGreater(peak, bound // 2, "the flood never filled the server's buffer")
        self.assertLessEqual(peak, bound + frame)
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
    def test_small_bound(self) -> None:
        yield self.flood(24 * 1024, reader=False, batch=1)

    @inlineCallbacks
    def test_pongs_count_against_the_bound(self) -> None:
        """A client flooding pings and never reading: the pongs are frames
        like any other, and it is closed once they pass the bound."""
        bound = 16 * 1024
        server = start_server(self, max_send_buffer=bound, rate_limit=0)
        client: RawClient = yield raw_connect(server.port, rcvbuf=4096, test=self)
        proto = server_side(server, client)
        small_kernel_buffer(proto)
        client.transport.pauseProducing()
        pings = ws_client_frame(b"x" * 125, opcode=0x9) * 100
        peak = 0
        for _ in range(300):
            if proto.state != proto.STATE_OPEN:
                break
            peak = max(peak, proto.unsent())
            client.transport.write(pings)
            yield sleep(0.005)
        self.assertEqual(server.stats.slow_consumer_closes, 1)
        self.assertEqual(proto.localCloseCode, 1013)
        self.assertLessEqual(peak, bound + 127)  # the bound and one pong
        yield wait_for(lambda: server.stats.sockets_closed["1013"] == 1, timeout=10)


class SlowReader:
    """A client on a blocking socket, in a thread: upgrades, subscribes to
    e1, then reads ``rate`` bytes a second until the server ends the
    connection; keeps every frame whole (a cut frame fails the parse)."""

    def __init__(self, port: int, rate: int = 10_000) -> None:
        self.port = port
        self.rate = rate
        self.local_port = 0
        self.subscribed = threading.Event()
        self.texts: list[bytes] = []
        self.close: tuple[int, bytes] | None = None
        self.ended = ""  # eof, reset or timeout

    def run(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", self.port))
        self.local_port = sock.getsockname()[1]
        sock.sendall(raw_upgrade_request())
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(4096)
        buffer = buffer.split(b"\r\n\r\n", 1)[1]
        sock.sendall(ws_client_frame(b'{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}'))
        deadline = time.monotonic() + 60
        chunk = self.rate // 10
        try:
            while time.monotonic() < deadline:
                data = sock.recv(chunk)
                if not data:
                    self.ended = "eof"
                    return
                buffer = self._frames(buffer + data)
                if self.texts:
                    self.subscribed.set()
                time.sleep(0.1)
            self.ended = "timeout"
        except ConnectionResetError:
            self.ended = "reset"
        finally:
            sock.close()
            self.subscribed.set()

    def _frames(self, buffer: bytes) -> bytes:
        while len(buffer) >= 2:
            size, head = buffer[1] & 0x7F, 2
            if size == 126:
                if len(buffer) < 4:
                    break
                size, head = struct.unpack("!H", buffer[2:4])[0], 4
            elif size == 127:
                if len(buffer) < 10:
                    break
                size, head = struct.unpack("!Q", buffer[2:10])[0], 10
            if len(buffer) < head + size:
                break
            opcode, payload = buffer[0] & 0x0F, buffer[head:head + size]
            buffer = buffer[head + size:]
            if self.close is not None:
                raise AssertionError(f"a frame after the close frame: opcode {opcode}")
            if opcode == 0x1:
                json.loads(payload)  # whole
                self.texts.append(payload)
            elif opcode == 0x8:
                self.close = (struct.unpack("!H", payload[:2])[0], payload[2:])
        return buffer


class SlowReaderClosed(TestCase):
    timeout = 90

    @inlineCallbacks
    def test_reader_at_10_kb_per_second_sees_1013(self) -> None:
        """Its queued events are dropped, the close frame follows what it
        was being sent, and the connection ends (no reset)."""
        bound = 32 * 1024
        server = start_server(self, max_send_buffer=bound)
        publisher = Publisher(server, pad="y" * 1000)  # ~1.2 KiB frames
        reader = SlowReader(server.port)
        done = threads.deferToThread(reader.run)
        yield threads.deferToThread(reader.subscribed.wait, 30)
        proto = next(p for p in server.factory.sockets if p.transport.getPeer().port == reader.local_port)
        small_kernel_buffer(proto)
        started = time.monotonic()
        while server.stats.slow_consumer_closes == 0:
            self.assertLess(time.monotonic() - started, 30, "never closed as a slow consumer")
            publisher.batch(10)
            yield sleep(0.01)
        closed_at = time.monotonic()
        yield done
        self.assertEqual(reader.close, (1013, b"slow consumer"))
        self.assertEqual(reader.ended, "eof")
        self.assertLess(len(reader.texts) - 1, publisher.sent)  # some were dropped
        self.assertLess(time.monotonic() - closed_at, 10)
        self.assertEqual(server.stats.sockets_closed["1013"], 1)
