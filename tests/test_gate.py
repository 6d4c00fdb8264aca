"""The sharded bus's subscribe gate (bus/gate.py), driven by a clock: a
subscribe waits for its channel's confirmation, at most the timeout, and
nothing of it is kept once answered.  The bus side is a small stand-in
for the gate's ``Channels`` protocol; the gate on a real cluster is
tested in test_bus_cluster and test_catchup_cluster."""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from autogpt_ws.bus.gate import ClusterGate
from autogpt_ws.core.channels import Layout


class Channels:
    def __init__(self) -> None:
        self.layout = Layout()
        self.reactor = Clock()
        self.wanted: Counter[str] = Counter()
        self.confirmed_channels: set[str] = set()

    def channel_for_key(self, key: str) -> str | None:
        user_id, _, graph = key.partition("|graph#")
        return self.layout.sharded_all(user_id, graph.split("|")[0]) if graph else None

    def want(self, channel: str) -> None:
        self.wanted[channel] += 1

    def unwant(self, channel: str) -> None:
        self.wanted[channel] -= 1
        if not self.wanted[channel]:
            del self.wanted[channel]

    def confirmed(self, channel: str) -> bool:
        return channel in self.confirmed_channels

    def placed(self, channel: str) -> Any:
        return None

    def recording(self) -> list[str]:
        return []


KEY = "u1|graph#g1|executions"
CHANNEL = "execution_event/{u1/g1}/all"


class Gate(TestCase):
    def setUp(self) -> None:
        self.bus = Channels()
        self.gate = ClusterGate(self.bus, None, None, timeout=5.0)  # type: ignore[arg-type]

    def answered(self) -> list[Any]:
        results: list[Any] = []
        self.gate.settle(KEY).addCallback(results.append)
        return results

    def test_a_confirmed_channel_answers_at_once(self) -> None:
        self.bus.confirmed_channels.add(CHANNEL)
        self.assertEqual(self.answered(), [[]])
        self.assertEqual(self.bus.wanted[CHANNEL], 1)  # held until released
        self.gate.release(KEY)
        self.assertNotIn(CHANNEL, self.bus.wanted)

    def test_a_subscribe_waits_for_its_confirmation(self) -> None:
        results = self.answered()
        self.bus.reactor.advance(1)
        self.assertEqual(results, [])
        self.gate.channel_confirmed(CHANNEL)
        self.assertEqual(results, [[]])
        self.assertEqual(self.gate._waiters, {})

    def test_an_unconfirmed_channel_is_answered_at_the_timeout_and_not_kept(self) -> None:
        results = [self.answered() for _ in range(3)]
        self.bus.reactor.advance(4.9)
        self.assertEqual(results, [[], [], []])
        self.bus.reactor.advance(0.2)
        self.assertEqual(results, [[[]], [[]], [[]]])
        self.assertEqual(self.gate._waiters, {})  # a shard away for long keeps nothing per subscribe
        for _ in range(3):
            self.gate.release(KEY)
        self.assertEqual(self.bus.wanted, Counter())
        self.gate.channel_confirmed(CHANNEL)  # confirmed later: nothing left to answer

    def test_stop_answers_the_waiting(self) -> None:
        results = self.answered()
        self.gate.stop()
        self.assertEqual(results, [[]])
        self.bus.reactor.advance(10)  # the timeout finds it answered


class SilentNode:
    """A master that takes commands and never answers."""

    def __init__(self) -> None:
        self.asked: list[tuple[Any, ...]] = []

    def command(self, *args: Any) -> Any:
        from twisted.internet.defer import Deferred

        self.asked.append(args)
        return Deferred()


class HandOver(TestCase):
    """The hand-over on a graceful stop is bounded by its budget even when a
    master never answers (on a real cluster: test_catchup_cluster)."""

    def test_a_master_that_never_answers_costs_at_most_the_budget(self) -> None:
        from types import SimpleNamespace

        bus = Channels()
        bus.recording = lambda: [CHANNEL]  # type: ignore[method-assign]
        bus.placed = lambda channel: ("127.0.0.1", 7000)  # type: ignore[method-assign]
        node = SilentNode()
        catchup = SimpleNamespace(store=SimpleNamespace(node=lambda address: node))
        gate = ClusterGate(bus, None, catchup, timeout=5.0)  # type: ignore[arg-type]
        done: list[Any] = []
        gate.hand_over(2.0).addBoth(done.append)
        self.assertEqual(node.asked, [("PUBSUB", "SHARDNUMSUB", CHANNEL)])
        bus.reactor.advance(1.9)
        self.assertEqual(done, [])
        bus.reactor.advance(0.1)
        self.assertEqual(done, [None])  # given up, not failed
        self.assertEqual(node.asked, [("PUBSUB", "SHARDNUMSUB", CHANNEL)])
