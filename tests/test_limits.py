"""Limits (issue 5, points 2 and 5; issue 14): total and per-user
connections, subscriptions per socket and the length of their ids, the
inbound rate (every frame, control frames included), the open-handshake
timeout, the inbound message size (after inflating, when compressed) and
its frames, and the Origin policy of the upgrade.  Real loopback sockets
throughout; the rate limit runs on an injected clock."""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from autogpt_ws.producing import publish
from autogpt_ws.sockets.limits import TokenBucket
from tests.helpers import (SECRET, HandshakeRefused, RawClient, U, deflated, raw_connect, server_side, sleep,
                           start_server, token, wait_for, ws_client_frame)
from tests.test_hub import PendingGate

HEARTBEAT = '{"method":"heartbeat","data":"ping","success":true}'
PONG = b'{"method":"heartbeat","data":"pong","success":true}'
LIMIT_REACHED = b'{"method":"error","data":null,"success":false,"channel":null,"error":"Subscription limit reached"}'
RATE_LIMITED = b'{"method":"error","data":null,"success":false,"channel":null,"error":"Rate limit exceeded"}'
INVALID_DATA = b'{"method":"error","data":null,"success":false,"channel":null,"error":"Invalid message data. Refer to the API schema"}'


def subscribe(exec_id: str) -> str:
    return '{"method":"subscribe_graph_execution","data":{"graph_exec_id":"%s"}}' % exec_id


def subscribed(exec_id: str, user: str = U) -> bytes:
    return ('{"method":"subscribe_graph_execution","data":null,"success":true,'
            '"channel":"%s|graph_exec#%s","error":null}' % (user, exec_id)).encode()


class Idle(Protocol):
    """A TCP client that writes ``data`` (maybe nothing) and waits."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.lost: Deferred[None] = Deferred()
        self.received = b""

    def connectionMade(self) -> None:
        if self.data:
            self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.lost.callback(None)


def idle_connect(test: TestCase, port: int, data: bytes = b"") -> Idle:
    proto = Idle(data)

    class Once(ClientFactory):
        def buildProtocol(self, addr: Any) -> Protocol:
            return proto

    reactor.connectTCP("127.0.0.1", port, Once())

    def drop() -> Deferred[None]:
        if not proto.lost.called and proto.transport is not None:
            proto.transport.abortConnection()
        return proto.lost

    test.addCleanup(drop)
    return proto


class Connections(TestCase):
    @inlineCallbacks
    def test_total_limit_refuses_upgrade_with_503(self) -> None:
        server = start_server(self, max_connections=2)
        first = yield raw_connect(server.port, test=self)
        yield raw_connect(server.port, test=self)
        failure = yield self.assertFailure(raw_connect(server.port, test=self), HandshakeRefused)
        self.assertEqual(failure.status, 503)
        self.assertEqual(server.stats.handshakes_refused["capacity"], 1)
        # a freed place can be taken again
        first.send(b"\x03\xe8", opcode=0x8)
        yield first.lost
        again = yield raw_connect(server.port, test=self)
        reply = yield again.request(HEARTBEAT)
        self.assertEqual(reply, PONG)

    @inlineCallbacks
    def test_per_user_limit_closes_1008(self) -> None:
        server = start_server(self, enable_auth=True, jwt_verify_key=SECRET, max_connections_per_user=2)
        path = f"/ws?token={token(sub='user-1')}"
        first = yield raw_connect(server.port, path=path, test=self)
        yield raw_connect(server.port, path=path, test=self)
        third = yield raw_connect(server.port, path=path, test=self)
        yield third.lost
        self.assertEqual((third.close_code, third.close_reason), (1008, "too many connections"))
        self.assertEqual(third.messages, [])
        self.assertEqual(server.stats.handshakes_refused["per_user"], 1)
        # another user is not affected
        other = yield raw_connect(server.port, path=f"/ws?token={token(sub='user-2')}", test=self)
        self.assertEqual((yield other.request(HEARTBEAT)), PONG)
        # and a closed socket frees its place
        first.send(b"\x03\xe8", opcode=0x8)
        yield first.lost
        fourth = yield raw_connect(server.port, path=path, test=self)
        self.assertEqual((yield fourth.request(HEARTBEAT)), PONG)
        self.assertIsNone(fourth.close_code)


class Subscriptions(TestCase):
    @inlineCallbacks
    def test_limit_replies_error_and_socket_stays_usable(self) -> None:
        server = start_server(self, max_subscriptions_per_socket=3)
        client = yield raw_connect(server.port, test=self)
        for exec_id in ("e1", "e2", "e3"):
            self.assertEqual((yield client.request(subscribe(exec_id))), subscribed(exec_id))
        self.assertEqual((yield client.request(subscribe("e4"))), LIMIT_REACHED)
        graph = '{"method":"subscribe_graph_executions","data":{"graph_id":"g1"}}'
        self.assertEqual((yield client.request(graph)), LIMIT_REACHED)
        # a key already held is not refused (the frontend re-sends its subscribes)
        self.assertEqual((yield client.request(subscribe("e2"))), subscribed("e2"))
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)
        # unsubscribing makes room
        yield client.request('{"method":"unsubscribe","data":{"graph_exec_id":"e1"}}')
        self.assertEqual((yield client.request(subscribe("e4"))), subscribed("e4"))
        self.assertEqual(server_side(server, client).keys, {f"{U}|graph_exec#{e}" for e in ("e2", "e3", "e4")})
        self.assertIsNone(client.close_code)


class TokenBucketUnit(TestCase):
    def test_burst_then_rate(self) -> None:
        bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
        self.assertEqual([bucket.take(100.0) for _ in range(4)], [True, True, True, False])
        self.assertEqual(bucket.refused, 1)
        self.assertFalse(bucket.take(100.4))  # 0.8 of a token
        self.assertTrue(bucket.take(100.5))  # refilled to 1
        self.assertEqual(bucket.refused, 0)
        self.assertTrue(all(bucket.take(200.0) for _ in range(3)))  # refills to the burst, no more
        self.assertFalse(bucket.take(200.0))

    def test_clock_going_back_does_not_refill(self) -> None:
        bucket = TokenBucket(rate=10.0, burst=1, now=50.0)
        self.assertTrue(bucket.take(50.0))
        self.assertFalse(bucket.take(40.0))
        self.assertFalse(bucket.take(50.05))
        self.assertTrue(bucket.take(50.1))


class RateLimit(TestCase):
    @inlineCallbacks
    def test_beyond_burst_error_then_sustained_abuse_closes_1008(self) -> None:
        server = start_server(self, rate_limit=2.0, rate_burst=3, rate_abuse_close=4)
        clock = Clock()
        server.factory.clock = clock  # the limiter reads the factory's clock
        client = yield raw_connect(server.port, test=self)
        for _ in range(3):
            self.assertEqual((yield client.request(HEARTBEAT)), PONG)
        self.assertEqual((yield client.request(HEARTBEAT)), RATE_LIMITED)
        clock.advance(0.5)  # one token back
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)
        for _ in range(3):
            self.assertEqual((yield client.request(HEARTBEAT)), RATE_LIMITED)
        self.assertIsNone(client.close_code)
        client.send(HEARTBEAT)  # the 4th refusal in a row
        yield client.lost
        self.assertEqual((client.close_code, client.close_reason), (1008, "rate limit exceeded"))
        self.assertEqual(server.stats.rate_limited, 5)
        yield wait_for(lambda: server.stats.sockets_closed["1008"] == 1)

    @inlineCallbacks
    def test_refused_frames_are_not_handled(self) -> None:
        server = start_server(self, rate_limit=1.0, rate_burst=1, rate_abuse_close=10)
        server.factory.clock = Clock()
        client = yield raw_connect(server.port, test=self)
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)
        self.assertEqual((yield client.request(subscribe("e1"))), RATE_LIMITED)
        self.assertEqual(server_side(server, client).keys, set())

    @inlineCallbacks
    def test_zero_rate_is_no_limit(self) -> None:
        server = start_server(self, rate_limit=0, rate_burst=1, rate_abuse_close=1)
        client = yield raw_connect(server.port, test=self)
        for _ in range(150):
            client.send(HEARTBEAT)
        yield client.message(149)
        self.assertEqual(set(client.messages), {PONG})
        self.assertEqual(server.stats.rate_limited, 0)


class OpenHandshakeTimeout(TestCase):
    @inlineCallbacks
    def test_silent_client_is_disconnected(self) -> None:
        server = start_server(self, open_handshake_timeout=0.3)
        idle = idle_connect(self, server.port)
        yield idle.lost
        self.assertEqual(idle.received, b"")

    @inlineCallbacks
    def test_half_request_is_disconnected(self) -> None:
        server = start_server(self, open_handshake_timeout=0.3)
        idle = idle_connect(self, server.port, b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        yield idle.lost

    @inlineCallbacks
    def test_trickled_request_is_disconnected(self) -> None:
        """A client sending its upgrade a byte at a time, each byte inside
        the timeout, must still be cut off: the timeout bounds the whole
        handshake, not the silence between bytes."""
        server = start_server(self, open_handshake_timeout=0.3)
        request = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 400
        idle = idle_connect(self, server.port)
        for index in range(len(request)):
            if idle.lost.called:
                break
            if idle.transport is not None:
                idle.transport.write(request[index:index + 1])
            yield sleep(0.1)
            self.assertLess(index, 30, "still connected after 3 s of a trickled request (timeout 0.3 s)")
        yield idle.lost

    @inlineCallbacks
    def test_no_timeout_when_off(self) -> None:
        server = start_server(self, open_handshake_timeout=0)
        idle = idle_connect(self, server.port)
        yield sleep(1.0)
        self.assertFalse(idle.lost.called)

    @inlineCallbacks
    def test_open_socket_outlives_the_handshake_timeout(self) -> None:
        server = start_server(self, open_handshake_timeout=0.3)
        client = yield raw_connect(server.port, test=self)
        yield sleep(1.0)
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)
        self.assertFalse(client.lost.called)


class FrameSize(TestCase):
    @inlineCallbacks
    def test_frame_at_limit_is_handled_and_over_it_closes_1009(self) -> None:
        server = start_server(self, max_inbound_frame=1024)
        client = yield raw_connect(server.port, test=self)
        at_limit = HEARTBEAT[:-1] + " " * (1024 - len(HEARTBEAT)) + "}"
        self.assertEqual(len(at_limit), 1024)
        self.assertEqual((yield client.request(at_limit)), PONG)
        client.send(HEARTBEAT[:-1] + " " * (1025 - len(HEARTBEAT)) + "}")
        yield client.lost
        self.assertEqual(client.close_code, 1009)
        self.assertEqual(len(client.messages), 1)

    @inlineCallbacks
    def test_fragmented_message_over_limit_closes_1009(self) -> None:
        server = start_server(self, max_inbound_frame=1024)
        client = yield raw_connect(server.port, test=self)
        client.send(b"[" + b" " * 599, fin=False)
        client.send(b" " * 599 + b"]", opcode=0x0)
        yield client.lost
        self.assertEqual(client.close_code, 1009)
        self.assertEqual(client.messages, [])


class Origins(TestCase):
    ALLOWED = ("https://app.example.com", r"regex:https://[a-z0-9-]+\.preview\.example\.com")

    @inlineCallbacks
    def status(self, port: int, origin: str | None) -> Any:
        headers = {"Origin": origin} if origin is not None else {}
        try:
            client = yield raw_connect(port, headers=headers, test=self)
        except HandshakeRefused as exc:
            return exc.status
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)
        return client.status

    @inlineCallbacks
    def test_allow_list_exact_and_regex(self) -> None:
        server = start_server(self, ws_allowed_origins=self.ALLOWED)
        self.assertEqual((yield self.status(server.port, "https://app.example.com")), 101)
        self.assertEqual((yield self.status(server.port, "https://pr-42.preview.example.com")), 101)
        for refused in ("https://evil.example.net", "http://app.example.com", "https://app.example.com.evil.net",
                        "https://pr-42.preview.example.com.evil.net", "null"):
            self.assertEqual((yield self.status(server.port, refused)), 403, refused)
        self.assertEqual(server.stats.handshakes_refused["origin"], 5)
        self.assertEqual((yield self.status(server.port, None)), 101)  # allowed by default

    @inlineCallbacks
    def test_missing_origin_refused_when_configured(self) -> None:
        server = start_server(self, ws_allowed_origins=self.ALLOWED, ws_allow_missing_origin=False)
        self.assertEqual((yield self.status(server.port, None)), 403)
        self.assertEqual(server.stats.handshakes_refused["origin_missing"], 1)
        self.assertEqual((yield self.status(server.port, "https://app.example.com")), 101)

    @inlineCallbacks
    def test_no_allow_list_accepts_any_origin(self) -> None:
        server = start_server(self, ws_allow_missing_origin=False)
        self.assertEqual((yield self.status(server.port, "https://anything.example.org")), 101)
        self.assertEqual((yield self.status(server.port, "null")), 101)
        self.assertEqual((yield self.status(server.port, None)), 101)

    @inlineCallbacks
    def test_null_origin_allowed_when_listed(self) -> None:
        server = start_server(self, ws_allowed_origins=("null",))
        self.assertEqual((yield self.status(server.port, "null")), 101)
        self.assertEqual((yield self.status(server.port, "https://app.example.com")), 403)


class SubscriptionIds(TestCase):
    """Ids are bounded (upstream's are UUIDs): 128 bytes of UTF-8."""

    @inlineCallbacks
    def test_id_of_128_bytes_accepted_129_refused(self) -> None:
        server = start_server(self)
        client = yield raw_connect(server.port, test=self)
        for ident in ("e" * 128, "é" * 64):  # 128 bytes either way
            self.assertEqual((yield client.request(subscribe(ident))), subscribed(ident))
        for ident in ("e" * 129, "é" * 64 + "e", "x" * 65000):
            self.assertEqual((yield client.request(subscribe(ident))), INVALID_DATA)
            graph = '{"method":"subscribe_graph_executions","data":{"graph_id":"%s"}}' % ident
            self.assertEqual((yield client.request(graph)), INVALID_DATA)
            gone = '{"method":"unsubscribe","data":{"graph_exec_id":"%s"}}' % ident
            self.assertEqual((yield client.request(gone)), INVALID_DATA)
        self.assertEqual(server_side(server, client).keys, {f"{U}|graph_exec#{e}" for e in ("e" * 128, "é" * 64)})


def pieces(message: str, count: int) -> list[tuple[bytes, int, bool]]:
    """``message`` as ``count`` frames: (payload, opcode, fin)."""
    data = message.encode()
    size = -(-len(data) // count)
    parts = [data[i * size:(i + 1) * size] for i in range(count)]
    return [(part, 0x1 if i == 0 else 0x0, i == count - 1) for i, part in enumerate(parts)]


def send_frames(client: RawClient, frames: list[tuple[bytes, int, bool]]) -> None:
    client.transport.write(b"".join(ws_client_frame(p, opcode, fin) for p, opcode, fin in frames))


class Frames(TestCase):
    """Frames, not only messages, are bounded: a message spans at most
    max_message_frames frames, and each frame takes a token of the rate
    limit (pings and empty continuation frames too)."""

    @inlineCallbacks
    def test_message_frames_bounded(self) -> None:
        server = start_server(self, rate_limit=0, max_message_frames=4)
        client = yield raw_connect(server.port, test=self)
        send_frames(client, pieces(HEARTBEAT, 4))
        self.assertEqual((yield client.message(0)), PONG)
        send_frames(client, pieces(HEARTBEAT, 5))
        yield client.lost
        self.assertEqual(client.close_code, 1009)
        self.assertIn("4 frames", client.close_reason or "")
        self.assertEqual(client.messages, [PONG])

    @inlineCallbacks
    def test_endless_empty_continuation_frames(self) -> None:
        """A message that never ends, in empty frames: closed at the frame
        bound, and nothing after it is read (the connection ends)."""
        server = start_server(self, rate_limit=0)
        client = yield raw_connect(server.port, answer_close=False, test=self)
        proto = server_side(server, client)
        client.send(b'{"method":', fin=False)
        empty = ws_client_frame(b"", opcode=0x0, fin=False)
        for _ in range(50):
            if client.lost.called:
                break
            client.transport.write(empty * 2000)
            yield sleep(0.01)
        yield wait_for(lambda: client.lost.called, timeout=10)
        self.assertEqual(client.close_code, 1009)
        self.assertEqual(proto.localCloseCode, 1009)
        self.assertLessEqual(proto._continuations, server.settings.max_message_frames)

    @inlineCallbacks
    def test_continuation_frames_take_rate_tokens(self) -> None:
        server = start_server(self, rate_limit=1.0, rate_burst=3, rate_abuse_close=5)
        clock = Clock()
        server.factory.clock = clock
        client = yield raw_connect(server.port, test=self)
        send_frames(client, pieces(HEARTBEAT, 3))  # 3 tokens
        self.assertEqual((yield client.message(0)), PONG)
        send_frames(client, pieces(HEARTBEAT, 2))  # none left: both frames refused
        self.assertEqual((yield client.message(1)), RATE_LIMITED)
        clock.advance(2.0)
        send_frames(client, pieces(HEARTBEAT, 3))  # 2 tokens for 3 frames: the message is refused
        self.assertEqual((yield client.message(2)), RATE_LIMITED)
        self.assertEqual(server.stats.rate_limited, 3)
        client.send(b'{"method":', fin=False)
        client.transport.write(ws_client_frame(b"", opcode=0x0, fin=False) * 5)  # 6 refused in a row
        yield client.lost
        self.assertEqual((client.close_code, client.close_reason), (1008, "rate limit exceeded"))

    @inlineCallbacks
    def test_pings_take_rate_tokens(self) -> None:
        """A ping over the rate gets no pong; pings over it in a row close
        the socket like any other frame."""
        server = start_server(self, rate_limit=2.0, rate_burst=3, rate_abuse_close=4)
        clock = Clock()
        server.factory.clock = clock
        client = yield raw_connect(server.port, test=self)
        for _ in range(4):
            client.send(b"p", opcode=0x9)
        yield wait_for(lambda: server.stats.rate_limited == 1)
        clock.advance(0.5)  # one token back
        self.assertEqual((yield client.request(HEARTBEAT)), PONG)  # answered after the pings
        self.assertEqual(client.pongs, 3)
        for _ in range(4):
            client.send(b"p", opcode=0x9)
        yield client.lost
        self.assertEqual((client.close_code, client.close_reason), (1008, "rate limit exceeded"))
        self.assertEqual(client.pongs, 3)


DEFLATE_LIMIT = 65536


def compressed(payload: bytes) -> bytes:
    return ws_client_frame(deflated(payload), rsv1=True)


def awkward(size: int) -> bytes:
    """Text that zlib compresses so that its last bytes come out of a
    back-reference whose codes end in the last input byte: inflating it
    ``size - 1``..``size - 8`` bytes at most consumes all input and leaves
    output pending (with this seed; found by search)."""
    rng = random.Random(139)
    pattern = bytes(rng.choice(range(0x21, 0x7F)) for _ in range(rng.randint(1, 300)))
    return (pattern * (size // len(pattern) + 1))[:size]


class CompressedMessages(TestCase):
    """permessage-deflate: the size limit applies after inflating, to the
    byte, and a message is never inflated more than one byte past it."""

    @inlineCallbacks
    def connect(self, server: Any, **kwargs: Any) -> Any:
        client = yield raw_connect(server.port, deflate=True, test=self, **kwargs)
        self.assertIsNotNone(server_side(server, client)._perMessageCompress)
        return client

    @inlineCallbacks
    def test_exactly_the_limit_after_inflating(self) -> None:
        server = start_server(self, rate_limit=0)
        self.assertEqual(server.settings.max_inbound_frame, DEFLATE_LIMIT)
        client = yield self.connect(server)
        exact = HEARTBEAT.encode() + b" " * (DEFLATE_LIMIT - len(HEARTBEAT))
        client.transport.write(compressed(exact))
        self.assertEqual((yield client.message(0)), PONG)
        # and in several frames, each split across writes
        body = deflated(exact)
        third = len(body) // 3
        frames = (ws_client_frame(body[:third], fin=False, rsv1=True) + ws_client_frame(body[third:2 * third], 0x0, False)
                  + ws_client_frame(body[2 * third:], 0x0))
        for start in range(0, len(frames), 7):
            client.transport.write(frames[start:start + 7])
        self.assertEqual((yield client.message(1)), PONG)

    @inlineCallbacks
    def test_one_to_eight_bytes_over_are_refused(self) -> None:
        server = start_server(self, rate_limit=0)
        for size in range(DEFLATE_LIMIT + 1, DEFLATE_LIMIT + 9):
            client = yield self.connect(server)
            client.transport.write(compressed(awkward(size)))
            yield wait_for(lambda: client.lost.called or client.messages, timeout=10)
            self.assertEqual((client.close_code, client.messages), (1009, []), size)
            self.assertIn(f"exceeds payload limit of {DEFLATE_LIMIT}", client.close_reason or "")

    @inlineCallbacks
    def test_bomb_cut_at_once(self) -> None:
        """60 MiB in a 60 KiB frame: inflated no further than the limit,
        closed 1009, nothing more read, and the connection ends at once,
        without waiting for the client to answer the close."""
        server = start_server(self, rate_limit=0)
        client = yield self.connect(server, answer_close=False)
        proto = server_side(server, client)
        bomb = compressed(b" " * (60 * 1024 * 1024))
        self.assertLess(len(bomb), DEFLATE_LIMIT)
        client.transport.write(bomb)
        client.transport.write(b"\x00" * (1024 * 1024))  # and it goes on sending
        yield client.lost
        self.assertEqual(client.close_code, 1009)
        self.assertLessEqual(proto._perMessageCompress._decompress_message_size, DEFLATE_LIMIT + 1)
        self.assertLess(len(proto.data), 65536)  # what it sent after was not kept
        self.assertIsInstance(client.lost_reason.value, ConnectionDone)  # our FIN, not the abort of a timeout

    @inlineCallbacks
    def test_large_event_to_a_compressing_socket(self) -> None:
        """The inbound limit is not applied to what the server sends: an
        event that stays over 64 KiB compressed reaches a compressing
        socket (Autobahn's option would refuse to send it)."""
        server = start_server(self)
        client = yield self.connect(server)
        client.send(subscribe("e1"))  # answered compressed
        self.assertEqual((yield client.message(0)), subscribed("e1"))
        noise = random.Random(5).randbytes(100_000).hex()  # ~100 KB deflated
        event = publish.node_event(U, "g1", "e1", "ne1", "RUNNING", output_data={"out": [noise]})
        yield server.bus.publish(server.layout.classic_exec(U, "g1", "e1"), publish.envelope(event))
        pushed = yield client.message(1)
        self.assertEqual(json.loads(pushed)["data"]["output_data"], {"out": [noise]})


class WaitingHandler(TestCase):
    """While a frame's handler waits (an execution lookup on the sharded
    bus), the socket's next frames wait in the client's TCP buffers: the
    server holds at most what it had read."""

    @inlineCallbacks
    def test_frames_wait_in_the_client_while_a_lookup_runs(self) -> None:
        server = start_server(self, rate_limit=0)
        resolver = PendingGate()
        server.factory.gate = lambda: resolver
        client = yield raw_connect(server.port, test=self)
        proto = server_side(server, client)
        client.send(subscribe("e1"))
        yield wait_for(lambda: resolver.pending)
        count = 20_000  # 1.4 MB of heartbeats
        client.transport.write(ws_client_frame(HEARTBEAT.encode()) * count)
        yield sleep(0.5)
        self.assertLessEqual(len(proto._inbox or ()) * len(HEARTBEAT), 2 * 65536)
        resolver.pending[0].callback(True)
        yield wait_for(lambda: len(client.messages) == 1 + count, timeout=30)
        self.assertEqual(client.messages[0], subscribed("e1"))
        self.assertEqual(set(client.messages[1:]), {PONG})

    @inlineCallbacks
    def test_rate_refusal_answered_in_turn(self) -> None:
        """A refusal of the rate limit waits behind the frames before it
        whose handler waits (PROTOCOL.md: each reply before the next frame
        is handled)."""
        server = start_server(self, rate_limit=1.0, rate_burst=3, rate_abuse_close=10)
        server.factory.clock = Clock()  # no token comes back
        resolver = PendingGate()
        server.factory.gate = lambda: resolver
        client = yield raw_connect(server.port, test=self)
        frames = (subscribe("e1"), HEARTBEAT, HEARTBEAT, HEARTBEAT, HEARTBEAT)  # the last two over the burst
        client.transport.write(b"".join(ws_client_frame(f.encode()) for f in frames))
        yield wait_for(lambda: resolver.pending)
        resolver.pending[0].callback(True)
        yield client.message(4)
        self.assertEqual(client.messages, [subscribed("e1"), PONG, PONG, RATE_LIMITED, RATE_LIMITED])

    @inlineCallbacks
    def test_many_frames_behind_a_waiting_handler(self) -> None:
        """Frames queued behind a waiting handler are handled in a loop,
        however many answer at once (a graph subscribe's settle has fired
        already): no recursion per frame."""
        server = start_server(self, rate_limit=0)
        resolver = PendingGate()
        server.factory.gate = lambda: resolver
        client = yield raw_connect(server.port, test=self)
        proto = server_side(server, client)
        graph = json.dumps({"method": "subscribe_graph_executions", "data": {"graph_id": "g1"}}).encode()
        count = 900  # one read (63 KB), all queued behind the first
        client.transport.write(ws_client_frame(subscribe("e1").encode()) + ws_client_frame(graph) * count)
        yield wait_for(lambda: resolver.pending)
        self.assertGreater(len(proto._inbox or ()), 400)  # what the first read brought: most of them
        resolver.pending[0].callback(True)
        yield wait_for(lambda: len(client.messages) == 1 + count)
        self.assertEqual(client.messages[0], subscribed("e1"))
        replies = [json.loads(m) for m in client.messages[1:]]
        self.assertEqual({(r["method"], r["success"]) for r in replies}, {("subscribe_graph_executions", True)})


class ClosingSocket(TestCase):
    """While the server waits for the client's close frame, the client's
    data frames are read (to reach it) and dropped, within the same bounds."""

    @inlineCallbacks
    def test_frames_after_the_servers_close_are_bounded(self) -> None:
        limit = 1024
        server = start_server(self, rate_limit=0, max_inbound_frame=limit)
        client = yield raw_connect(server.port, answer_close=False, test=self)
        proto = server_side(server, client)
        piece = b"x" * 512
        frames = [ws_client_frame(b"\x00", opcode=0x2),  # closed 1003
                  ws_client_frame(piece, fin=False)] + [ws_client_frame(piece, opcode=0x0, fin=False)] * 30
        client.transport.write(b"".join(frames))
        yield client.lost
        self.assertEqual(client.close_code, 1003)
        self.assertFalse(proto.wasCloseHandshakeTimeout)  # dropped at the bound, not 3 s later
        self.assertLessEqual(sum(map(len, proto.message_data)), limit)
        yield wait_for(lambda: server.stats.sockets_closed["1003"] == 1)
