"""Hash slots, slot maps and the small parsers of the cluster bus (no Redis
needed; tests/test_bus_cluster.py compares key_slot with a live cluster)."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from autogpt_ws.bus.resp import RedisProtocol, encode
from autogpt_ws.bus.shard import BACKOFF_MAX, backoff, moved_target
from autogpt_ws.bus.slots import SLOTS, SlotMap, crc16, format_address, hash_tag, key_slot, parse_address
from autogpt_ws.core.channels import Layout

# Answers of `redis-cli CLUSTER KEYSLOT <key>` (Redis 7.0.15).
KNOWN = {
    "foo": 12182,
    "123456789": 12739,
    "{user1000}.following": 3443,
    "a{}b": 13694,  # empty tag: the whole key is hashed
    "{}{x}": 3257,  # the first { and the next } decide: empty, so whole key
    "{a}": 15495,
    "execution_event/{u1/g1}/all": 15028,
}


class SlotTests(TestCase):
    def test_crc16_xmodem_check_value(self) -> None:
        # the CRC16-XMODEM check value of the standard test string
        self.assertEqual(crc16(b"123456789"), 0x31C3)
        self.assertEqual(crc16(b""), 0)

    def test_known_keyslots(self) -> None:
        for key, slot in KNOWN.items():
            self.assertEqual(key_slot(key), slot, key)
            self.assertEqual(key_slot(key.encode()), slot, key)

    def test_hash_tag_rules(self) -> None:
        self.assertEqual(hash_tag(b"x{a}y{b}"), b"a")
        self.assertEqual(hash_tag(b"x{}y{b}"), b"x{}y{b}")
        self.assertEqual(hash_tag(b"{a"), b"{a")
        self.assertEqual(hash_tag(b"}a{b}"), b"b")

    def test_a_graphs_channels_share_a_slot(self) -> None:
        layout = Layout()
        slots = {key_slot(layout.sharded_all("u", "g")), key_slot(layout.sharded_exec("u", "g", "e1")),
                 key_slot(layout.sharded_exec("u", "g", "e2"))}
        self.assertEqual(len(slots), 1)
        self.assertEqual(slots, {key_slot("u/g")})

    def test_unicode_is_hashed_as_utf8(self) -> None:
        self.assertEqual(key_slot("é{ü}"), crc16("ü".encode()) % SLOTS)


class SlotMapTests(TestCase):
    reply: list[Any] = [
        [0, 5460, [b"10.0.0.1", 7000, b"id1", []], [b"10.0.0.4", 7003, b"id4", []]],
        [5461, 10922, [b"", 7001, b"id2", []]],
        [10923, 16382, [b"?", 7002, b"id3", []]],
    ]

    def test_from_cluster_slots(self) -> None:
        slots = SlotMap.from_cluster_slots(self.reply, ("seed", 9000))
        self.assertEqual(slots.owner(0), ("10.0.0.1", 7000))
        self.assertEqual(slots.owner(5460), ("10.0.0.1", 7000))
        self.assertEqual(slots.owner(5461), ("seed", 7001))  # empty host: the node we asked
        self.assertIsNone(slots.owner(10923))  # unknown endpoint
        self.assertIsNone(slots.owner(16383))  # not in the reply
        self.assertEqual(slots.masters(), {("10.0.0.1", 7000), ("seed", 7001)})
        self.assertFalse(slots.covered())
        self.assertEqual(slots.owner_of("{user1000}.following"), ("10.0.0.1", 7000))  # slot 3443
        self.assertIsNone(slots.owner_of("foo"))  # slot 12182: unknown endpoint

    def test_with_owner_is_a_copy(self) -> None:
        slots = SlotMap.from_cluster_slots(self.reply, ("seed", 9000))
        moved = slots.with_owner(3, ("10.0.0.9", 7009))
        self.assertEqual(moved.owner(3), ("10.0.0.9", 7009))
        self.assertEqual(slots.owner(3), ("10.0.0.1", 7000))

    def test_addresses(self) -> None:
        self.assertEqual(parse_address("127.0.0.1:7000"), ("127.0.0.1", 7000))
        self.assertEqual(parse_address("[::1]:7000"), ("::1", 7000))
        self.assertEqual(format_address(("::1", 7000)), "[::1]:7000")
        for bad in ("host", ":7000", "host:port"):
            self.assertRaises(ValueError, parse_address, bad)

    def test_moved_target(self) -> None:
        self.assertEqual(moved_target("MOVED 3999 127.0.0.1:6381"), (3999, ("127.0.0.1", 6381)))
        self.assertIsNone(moved_target("ASK 3999 127.0.0.1:6381"))
        self.assertIsNone(moved_target("CLUSTERDOWN The cluster is down"))
        self.assertEqual(moved_target("MOVED 12 ::1:7000"), (12, ("::1", 7000)))
        self.assertIsNone(moved_target("MOVED nonsense"))

    def test_backoff_doubles_to_eight_seconds_with_jitter(self) -> None:
        self.assertEqual([backoff(n, lambda: 0.5) for n in (1, 2, 3, 4, 5, 6, 9)],
                         [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0])
        self.assertAlmostEqual(backoff(1, lambda: 0.0), 0.4)
        self.assertAlmostEqual(backoff(9, lambda: 1.0), BACKOFF_MAX * 1.2)


def ack(verb: bytes, channel: bytes, count: int) -> bytes:
    return b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n:%d\r\n" % (len(verb), verb, len(channel), channel, count)


class AckMatchingTests(TestCase):
    """A server-sent ``sunsubscribe`` (slot migrated) that arrives while a
    subscribe command waits for its ack must reach ``on_push``, not be taken
    for that command's ack (fed to the protocol: no Redis needed)."""

    def setUp(self) -> None:
        self.pushes: list[list[Any]] = []
        self.proto = RedisProtocol(on_push=self.pushes.append)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def test_push_while_ssubscribe_pending(self) -> None:
        done: list[Any] = []
        self.proto.subscribe("SSUBSCRIBE", ["a"]).addCallback(done.append)
        self.assertEqual(self.transport.value(), encode(["SSUBSCRIBE", "a"]))
        self.proto.dataReceived(ack(b"sunsubscribe", b"b", 0))
        self.assertEqual(done, [])
        self.assertEqual(self.pushes, [[b"sunsubscribe", b"b", 0]])
        self.proto.dataReceived(ack(b"ssubscribe", b"a", 1))
        self.assertEqual(done, [[[b"ssubscribe", b"a", 1]]])

    def test_push_for_another_channel_while_sunsubscribe_pending(self) -> None:
        done: list[Any] = []
        self.proto.subscribe("SUNSUBSCRIBE", ["a"]).addCallback(done.append)
        self.proto.dataReceived(ack(b"sunsubscribe", b"b", 1) + ack(b"sunsubscribe", b"a", 0))
        self.assertEqual(self.pushes, [[b"sunsubscribe", b"b", 1]])
        self.assertEqual(done, [[[b"sunsubscribe", b"a", 0]]])

    def test_unsubscribe_from_nothing_still_counts(self) -> None:
        done: list[Any] = []
        self.proto.subscribe("SUNSUBSCRIBE", []).addCallback(done.append)
        self.proto.dataReceived(b"*3\r\n$12\r\nsunsubscribe\r\n$-1\r\n:0\r\n")
        self.assertEqual(done, [[[b"sunsubscribe", None, 0]]])
        self.assertEqual(self.pushes, [])

    def test_a_reply_nested_in_lists_answers_the_command(self) -> None:
        """CLUSTER SLOTS answers a list of lists: not a pub/sub message."""
        done: list[Any] = []
        self.proto.command("CLUSTER", "SLOTS").addCallback(done.append)
        self.proto.dataReceived(b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:7000\r\n")
        self.assertEqual(done, [[[0, 16383, [b"127.0.0.1", 7000]]]])
