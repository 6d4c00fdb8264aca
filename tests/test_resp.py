"""The RESP reader under the buses: replies split or merged in any way
arrive whole and in order, and a failing message handler costs one message,
not the stream."""

import random

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from autogpt_ws.bus.resp import FEED_SIZE, RedisProtocol, encode


def push(*parts: bytes) -> bytes:
    return encode(parts)


def stream(count: int) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """count pushes of every message kind and size (some larger than
    FEED_SIZE), and the (channel, data) each must arrive as."""
    wire, expected = [], []
    for index in range(count):
        channel = b"execution_event/u%d/g/e%d" % (index % 7, index)
        data = b'{"n":%d,"pad":"%s"}' % (index, b"x" * (index * 37 % 900 if index % 50 else FEED_SIZE * 2 + 5))
        kind = index % 3
        if kind == 0:
            wire.append(push(b"pmessage", b"execution_event/*/*/*", channel, data))
        elif kind == 1:
            wire.append(push(b"message", channel, data))
        else:
            wire.append(push(b"smessage", channel, data))
        expected.append((channel, data))
    return wire, expected


class Reassembly(TestCase):
    def setUp(self) -> None:
        self.received: list[tuple[bytes, bytes]] = []
        self.proto = RedisProtocol(on_message=lambda channel, data: self.received.append((channel, data)))
        self.proto.makeConnection(StringTransport())

    def test_one_read_far_larger_than_a_feed(self) -> None:
        pushes, expected = stream(400)
        data = b"".join(pushes)
        self.assertGreater(len(data), 20 * FEED_SIZE)
        self.proto.dataReceived(data)
        self.assertEqual(self.received, expected)

    def test_reads_cut_anywhere(self) -> None:
        pushes, expected = stream(400)
        data = b"".join(pushes)
        cuts = random.Random(7)
        offset = 0
        while offset < len(data):
            size = cuts.choice((1, 2, 17, 500, FEED_SIZE - 1, FEED_SIZE, FEED_SIZE + 1, 3 * FEED_SIZE + 11))
            self.proto.dataReceived(data[offset:offset + size])
            offset += size
        self.assertEqual(self.received, expected)

    def test_replies_between_messages_answer_their_commands(self) -> None:
        answers: list[object] = []
        self.proto.command("PING").addCallback(answers.append)
        self.proto.command("GET", "k").addCallback(answers.append)
        pushes, expected = stream(100)
        self.proto.dataReceived(b"".join(pushes[:50]) + b"+PONG\r\n" + b"".join(pushes[50:]) + b"$5\r\nvalue\r\n")
        self.assertEqual((answers, self.received), ([b"PONG", b"value"], expected))


class HandlerFailure(TestCase):
    def test_a_failing_message_is_logged_and_the_rest_arrive(self) -> None:
        received: list[bytes] = []

        def handle(channel: bytes, data: bytes) -> None:
            if data == b"bad":
                raise ZeroDivisionError("a bug in the router")
            received.append(data)

        proto = RedisProtocol(on_message=handle)
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"".join(push(b"message", b"ch", d) for d in (b"1", b"bad", b"2", b"3")))
        self.assertEqual(received, [b"1", b"2", b"3"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class NoHandler(TestCase):
    def test_a_connection_that_subscribes_to_nothing_ignores_messages(self) -> None:
        proto = RedisProtocol()
        proto.makeConnection(StringTransport())
        answers: list[object] = []
        proto.command("PING").addCallback(answers.append)
        proto.dataReceived(push(b"message", b"ch", b"stray") + b"+PONG\r\n")
        self.assertEqual(answers, [b"PONG"])  # the message is not taken for the answer
