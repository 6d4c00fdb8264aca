"""Section 3 and the reference table of section 7, over real loopback
sockets with a real Autobahn client, compared byte for byte (issue 3,
points 2 and 7)."""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from autogpt_ws.producing import publish
from autogpt_ws.running.service import WebsocketServer
from tests.helpers import Client, U, connect, start_server, wait_for

Ub = U.encode()

PING = b'{"method":"heartbeat","data":"ping","success":true}'
PONG = b'{"method":"heartbeat","data":"pong","success":true}'


def err(message: str) -> bytes:
    return b'{"method":"error","data":null,"success":false,"channel":null,"error":"' + message.encode() + b'"}'


E_FORMAT = err("Invalid message format. Review the schema and retry")
E_MISSING = err("Subscription data missing")
E_INVALID = err("Invalid message data. Refer to the API schema")
E_NOT_PROCESSED = err("Message type is not processed by the server")


def sub_exec(ident: str) -> bytes:
    return ('{"method":"subscribe_graph_execution","data":{"graph_exec_id":"%s"}}' % ident).encode("utf-8")


def sub_graph(ident: str) -> bytes:
    return ('{"method":"subscribe_graph_executions","data":{"graph_id":"%s"}}' % ident).encode("utf-8")


def unsub_exec(ident: str) -> bytes:
    return ('{"method":"unsubscribe","data":{"graph_exec_id":"%s"}}' % ident).encode("utf-8")


def unsub_graph(ident: str) -> bytes:
    return ('{"method":"unsubscribe","data":{"graph_id":"%s"}}' % ident).encode("utf-8")


def subscribed_exec(ident: str, user: str = U) -> bytes:
    return ('{"method":"subscribe_graph_execution","data":null,"success":true,"channel":"%s|graph_exec#%s","error":null}'
            % (user, ident)).encode("utf-8")


def subscribed_graph(ident: str, user: str = U) -> bytes:
    return ('{"method":"subscribe_graph_executions","data":null,"success":true,"channel":"%s|graph#%s|executions","error":null}'
            % (user, ident)).encode("utf-8")


def unsubscribed(key: str | None) -> bytes:
    channel = "null" if key is None else '"%s"' % key
    return ('{"method":"unsubscribe","data":null,"success":true,"channel":%s,"error":null}' % channel).encode("utf-8")


# PROTOCOL.md section 7, with U spelled out; None: the server sends nothing
REFERENCE: list[tuple[bytes, bytes | None]] = [
    (PING, PONG),
    (b'{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e1"}}',
     b'{"method":"subscribe_graph_execution","data":null,"success":true,"channel":"' + Ub + b'|graph_exec#e1","error":null}'),
    (b'{"method":"unsubscribe","data":{"graph_exec_id":"never"}}',
     b'{"method":"unsubscribe","data":null,"success":true,"channel":null,"error":null}'),
    (b'{"method":"subscribe_graph_execution","data":{}}',
     b'{"method":"error","data":null,"success":false,"channel":null,"error":"Subscription data missing"}'),
    (b'{"method":"subscribe_graph_execution","data":{"graph_exec_id":5}}',
     b'{"method":"error","data":null,"success":false,"channel":null,"error":"Invalid message data. Refer to the API schema"}'),
    (b"not json",
     b'{"method":"error","data":null,"success":false,"channel":null,"error":"Invalid message format. Review the schema and retry"}'),
    (b'{"method":"node_execution_event"}',
     b'{"method":"error","data":null,"success":false,"channel":null,"error":"Message type is not processed by the server"}'),
    (b'{"method":"error","data":"x"}', None),
]

# Section 3, row by row, in variants
SECTION3: list[tuple[bytes, bytes]] = [
    # not JSON / not an object / method missing or unknown / a key of the wrong type
    (b"", E_FORMAT), (b"{", E_FORMAT), (b"{'method':'heartbeat'}", E_FORMAT), (b"[]", E_FORMAT),
    (b'"heartbeat"', E_FORMAT), (b"null", E_FORMAT), (b"42", E_FORMAT), (b"{}", E_FORMAT),
    (b'{"data":"ping"}', E_FORMAT), (b'{"method":"Heartbeat"}', E_FORMAT), (b'{"method":"subscribe"}', E_FORMAT),
    (b'{"method":null}', E_FORMAT), (b'{"method":7}', E_FORMAT),
    (b'{"method":"heartbeat","data":1}', E_FORMAT), (b'{"method":"heartbeat","data":true}', E_FORMAT),
    (b'{"method":"heartbeat","data":2.5}', E_FORMAT), (b'{"method":"heartbeat","channel":1}', E_FORMAT),
    (b'{"method":"heartbeat","success":"yes"}', E_FORMAT), (b'{"method":"heartbeat","error":{}}', E_FORMAT),
    (b'{"method":"subscribe_graph_execution","data":0}', E_FORMAT),
    # heartbeat, any data, unknown keys ignored
    (b'{"method":"heartbeat"}', PONG), (b'{"method":"heartbeat","data":null}', PONG),
    (b'{"method":"heartbeat","data":{"a":1}}', PONG), (b'{"method":"heartbeat","data":[1]}', PONG),
    (b'{"method":"heartbeat","data":"","success":false,"channel":"c","error":"e","extra":1}', PONG),
    (b' {\n "method" : "heartbeat" }\n', PONG),
    # subscribe / unsubscribe: data missing, null or empty
    (b'{"method":"subscribe_graph_execution"}', E_MISSING),
    (b'{"method":"subscribe_graph_execution","data":null}', E_MISSING),
    (b'{"method":"subscribe_graph_execution","data":[]}', E_MISSING),
    (b'{"method":"subscribe_graph_execution","data":""}', E_MISSING),
    (b'{"method":"subscribe_graph_executions","data":{}}', E_MISSING),
    (b'{"method":"unsubscribe","data":{}}', E_MISSING),
    (b'{"method":"unsubscribe"}', E_MISSING),
    # wrong shape
    (b'{"method":"subscribe_graph_execution","data":["e1"]}', E_INVALID),
    (b'{"method":"subscribe_graph_execution","data":"e1"}', E_INVALID),
    (b'{"method":"subscribe_graph_execution","data":{"id":"e1"}}', E_INVALID),
    (b'{"method":"subscribe_graph_execution","data":{"graph_exec_id":null}}', E_INVALID),
    (b'{"method":"subscribe_graph_execution","data":{"graph_exec_id":["e1"]}}', E_INVALID),
    (b'{"method":"subscribe_graph_executions","data":{"graph_id":5}}', E_INVALID),
    (b'{"method":"subscribe_graph_executions","data":{"graph_exec_id":"e1"}}', E_INVALID),
    (b'{"method":"unsubscribe","data":["e1"]}', E_INVALID),
    (b'{"method":"unsubscribe","data":{"graph_exec_id":1}}', E_INVALID),
    # server-only methods
    (b'{"method":"graph_execution_event","data":{}}', E_NOT_PROCESSED),
    (b'{"method":"node_execution_event"}', E_NOT_PROCESSED),
    (b'{"method":"notification","data":{"type":"t"}}', E_NOT_PROCESSED),
    # subscriptions that work; data with extra keys
    (sub_exec("e1"), subscribed_exec("e1")),
    (b'{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e2","graph_id":"g","x":[1]},"success":null}',
     subscribed_exec("e2")),
    (sub_graph("g1"), subscribed_graph("g1")),
    (unsub_exec("e1"), unsubscribed(U + "|graph_exec#e1")),
    (unsub_graph("g1"), unsubscribed(U + "|graph#g1|executions")),
]


class WireOverSockets(TestCase):
    """Every frame a client can send, answered with the exact bytes."""

    def server(self, **overrides: Any) -> WebsocketServer:
        return start_server(self, **overrides)

    @inlineCallbacks
    def assertExchange(self, client: Client, pairs: Sequence[tuple[bytes, bytes | None]]) -> Any:
        for sent, expected in pairs:
            if expected is None:
                # no reply: the next message must answer the heartbeat after it
                index = len(client.messages)
                client.send(sent)
                reply = yield client.request(PING)
                self.assertEqual(client.messages[index:], [PONG], sent)
            else:
                reply = yield client.request(sent)
                self.assertEqual(reply, expected, sent)

    @inlineCallbacks
    def test_reference_table(self) -> Any:
        server = self.server()
        client = yield connect(server.port, token="anything", test=self)
        yield self.assertExchange(client, REFERENCE)

    @inlineCallbacks
    def test_reference_table_with_permessage_deflate(self) -> Any:
        """A compressing client gets the same bytes."""
        server = self.server()
        client = yield connect(server.port, compress=True, test=self)
        self.assertIsNotNone(client._perMessageCompress, "permessage-deflate was not negotiated")
        yield self.assertExchange(client, REFERENCE)

    @inlineCallbacks
    def test_section3_rows(self) -> Any:
        server = self.server(rate_limit=0)
        client = yield connect(server.port, test=self)
        yield self.assertExchange(client, SECTION3)

    @inlineCallbacks
    def test_no_reply_to_error(self) -> Any:
        server = self.server()
        client = yield connect(server.port, test=self)
        yield self.assertExchange(client, [
            (b'{"method":"error"}', None),
            (b'{"method":"error","data":null}', None),
            (b'{"method":"error","data":{"message":"boom"},"success":false,"error":"e"}', None),
            ('{"method":"error","data":"é☃"}'.encode("utf-8"), None),
        ])
        self.assertEqual(client.messages, [PONG] * 4)

    @inlineCallbacks
    def test_subscribe_twice_answered_twice(self) -> Any:
        server = self.server()
        client = yield connect(server.port, test=self)
        yield self.assertExchange(client, [
            (sub_exec("e1"), subscribed_exec("e1")),
            (sub_exec("e1"), subscribed_exec("e1")),
            (sub_graph("g1"), subscribed_graph("g1")),
            (sub_graph("g1"), subscribed_graph("g1")),
        ])
        self.assertEqual(server.hub.stats(), {"keys": 2, "users": 1, "subscriptions": 2})

    @inlineCallbacks
    def test_raw_utf8_replies(self) -> Any:
        server = self.server()
        client = yield connect(server.port, test=self)
        ident = "é☃😀"
        reply = yield client.request(sub_exec(ident))
        self.assertEqual(reply, ('{"method":"subscribe_graph_execution","data":null,"success":true,'
                                 '"channel":"%s|graph_exec#é☃😀","error":null}' % U).encode("utf-8"))
        self.assertNotIn(b"\\u", reply)
        # an escaped id in the request is still answered raw
        reply = yield client.request(b'{"method":"subscribe_graph_executions","data":{"graph_id":"\\u00e9"}}')
        self.assertEqual(reply, subscribed_graph("é"))

    @inlineCallbacks
    def test_unsubscribe_channel_rule(self) -> Any:
        server = self.server()
        client = yield connect(server.port, test=self)
        key = U + "|graph_exec#e1"
        yield self.assertExchange(client, [
            (unsub_exec("e1"), unsubscribed(None)),      # never subscribed
            (sub_exec("e1"), subscribed_exec("e1")),
            (unsub_exec("e1"), unsubscribed(key)),       # held it
            (unsub_exec("e1"), unsubscribed(None)),      # no longer
        ])
        self.assertFalse(server.hub.wants(key))

    @inlineCallbacks
    def test_unsubscribe_of_a_key_held_by_another_socket_of_the_user(self) -> Any:
        """The key had a subscriber on this server before the call: answered
        with the key, although this socket never held it; the other socket
        keeps its subscription."""
        server = self.server()
        holder = yield connect(server.port, test=self)
        other = yield connect(server.port, test=self)
        yield self.assertExchange(holder, [(sub_exec("e1"), subscribed_exec("e1"))])
        yield self.assertExchange(other, [(unsub_exec("e1"), unsubscribed(U + "|graph_exec#e1"))])
        self.assertTrue(server.hub.wants(U + "|graph_exec#e1"))
        # the holder still gets the execution's events
        yield publish.publish_event(server.bus, server.layout, publish.node_event(U, "g1", "e1", "n1", "RUNNING"))
        pushed = yield holder.message(1)
        self.assertTrue(pushed.startswith(b'{"method":"node_execution_event","data":{'), pushed)
        yield self.assertExchange(other, [(PING, PONG)])
        self.assertEqual(other.messages, [unsubscribed(U + "|graph_exec#e1"), PONG])

    @inlineCallbacks
    def test_unsubscribe_graph_extension(self) -> Any:
        server = self.server()
        client = yield connect(server.port, test=self)
        key = U + "|graph#g1|executions"
        yield self.assertExchange(client, [
            (unsub_graph("g1"), unsubscribed(None)),
            (sub_graph("g1"), subscribed_graph("g1")),
            (unsub_graph("g1"), unsubscribed(key)),
            (unsub_graph("g1"), unsubscribed(None)),
        ])
        self.assertEqual(list(server.hub.keys()), [])

    @inlineCallbacks
    def test_frames_answered_in_order(self) -> Any:
        """Many mixed frames sent at once, without waiting: one reply each,
        in the order of the frames (no reply for `error`)."""
        server = self.server(rate_limit=0)
        client = yield connect(server.port, test=self)
        pairs: list[tuple[bytes, bytes | None]] = []
        for i in range(40):
            pairs += [
                (sub_exec(f"e{i}"), subscribed_exec(f"e{i}")),
                (b"nope", E_FORMAT),
                (PING, PONG),
                (b'{"method":"error","data":"x"}', None),
                (unsub_exec(f"e{i}"), unsubscribed(f"{U}|graph_exec#e{i}")),
                (unsub_exec(f"e{i}"), unsubscribed(None)),  # proves the previous one took effect first
                (b'{"method":"notification"}', E_NOT_PROCESSED),
                (sub_graph(f"g{i}"), subscribed_graph(f"g{i}")),
                (b'{"method":"subscribe_graph_execution","data":{}}', E_MISSING),
                (b'{"method":"subscribe_graph_executions","data":"x"}', E_INVALID),
            ]
        for sent, _ in pairs:
            client.send(sent)
        expected = [reply for _, reply in pairs if reply is not None]
        yield client.message(len(expected) - 1, timeout=20)
        yield client.request(PING)
        self.assertEqual(client.messages, expected + [PONG])

    @inlineCallbacks
    def test_frames_in_order_within_the_default_burst(self) -> Any:
        """Default settings (rate limit on): a burst a frontend could send."""
        server = self.server()
        client = yield connect(server.port, test=self)
        frames = [sub_exec(f"e{i}") if i % 2 else PING for i in range(50)]
        for frame in frames:
            client.send(frame)
        yield client.message(49)
        self.assertEqual(client.messages, [subscribed_exec(f"e{i}") if i % 2 else PONG for i in range(50)])

    @inlineCallbacks
    def test_binary_frame_closes_1003(self) -> Any:
        server = self.server()
        client = yield connect(server.port, test=self)
        yield client.request(PING)
        client.sendMessage(PING, isBinary=True)
        code, _reason = yield client.closed
        self.assertEqual(code, 1003)
        self.assertEqual(client.messages, [PONG])
        self.assertEqual(client.binary, [])
        yield wait_for(lambda: not server.factory.sockets)

    @inlineCallbacks
    def test_inbound_limit_default_64k(self) -> Any:
        server = self.server()
        self.assertEqual(server.settings.max_inbound_frame, 65536)
        client = yield connect(server.port, test=self)
        head = b'{"method":"heartbeat","data":"'
        tail = b'"}'
        exact = head + b"x" * (65536 - len(head) - len(tail)) + tail
        self.assertEqual(len(exact), 65536)
        reply = yield client.request(exact)
        self.assertEqual(reply, PONG)
        client.send(head + b"x" * (65537 - len(head) - len(tail)) + tail)
        code, _reason = yield client.closed
        self.assertEqual(code, 1009)
        self.assertEqual(client.messages, [PONG])

    @inlineCallbacks
    def test_inbound_limit_configured(self) -> Any:
        server = self.server(max_inbound_frame="1KiB")
        client = yield connect(server.port, test=self)
        head = b'{"method":"heartbeat","data":"'
        tail = b'"}'
        reply = yield client.request(head + b"y" * (1024 - len(head) - len(tail)) + tail)
        self.assertEqual(reply, PONG)
        client.send(head + b"y" * (1025 - len(head) - len(tail)) + tail)
        code, _reason = yield client.closed
        self.assertEqual(code, 1009)
        self.assertEqual(client.messages, [PONG])

    @inlineCallbacks
    def test_inbound_limit_applies_to_fragmented_messages(self) -> Any:
        server = self.server(max_inbound_frame="1KiB")
        client = yield connect(server.port, test=self)
        client.autoFragmentSize = 256  # 1025 bytes in five frames, each under the limit
        head = b'{"method":"heartbeat","data":"'
        tail = b'"}'
        client.send(head + b"z" * (1025 - len(head) - len(tail)) + tail)
        code, _reason = yield client.closed
        self.assertEqual(code, 1009)
        self.assertEqual(client.messages, [])

    @inlineCallbacks
    def test_deflate_push_has_the_same_bytes(self) -> Any:
        """Pushed events too: a compressing socket and a plain one get the
        same frame."""
        server = self.server()
        plain = yield connect(server.port, test=self)
        deflate = yield connect(server.port, compress=True, test=self)
        for client in (plain, deflate):
            yield client.request(sub_exec("e1"))
        event = b'{"user_id":"%s","graph_id":"g1","graph_exec_id":"e1","note":"\xc3\xa9  spaced" ,' \
                b'"event_type":"node_execution_update"}' % Ub
        yield server.bus.publish(server.layout.classic_exec(U, "g1", "e1"), b'{"payload":' + event + b"}")
        expected = (b'{"method":"node_execution_event","data":' + event
                    + b',"success":null,"channel":"' + Ub + b'|graph_exec#e1","error":null}')
        for client in (plain, deflate):
            pushed = yield client.message(1)
            self.assertEqual(pushed, expected)

    @inlineCallbacks
    def test_sockets_are_independent(self) -> Any:
        """A socket closed for a bad frame does not disturb another."""
        server = self.server()
        bad = yield connect(server.port, test=self)
        good = yield connect(server.port, test=self)
        yield good.request(sub_exec("e1"))
        bad.sendMessage(b"\x00\x01", isBinary=True)
        yield bad.closed
        reply = yield good.request(PING)
        self.assertEqual(reply, PONG)
        self.assertTrue(server.hub.wants(U + "|graph_exec#e1"))
