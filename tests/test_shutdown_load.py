"""Graceful shutdown under load (issue 5, point 7): 5,000 connected and
subscribed sockets all receive a 1001 close frame and stopService finishes
within its bound; sockets that never answer the close are aborted at the
bound."""

from __future__ import annotations

import resource
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from tests.helpers import RawClient, raw_connect, start_server

SOCKETS = 5000
WAVE = 40  # connects in flight at once: under the listen backlog (50)
SUBSCRIBE = '{"method":"subscribe_graph_execution","data":{"graph_exec_id":"e%d"}}'


def need_descriptors(test: TestCase, count: int) -> None:
    """Raise the soft RLIMIT_NOFILE to ``count`` (up to the hard limit) for
    the test, or skip it."""
    if "select" in type(reactor).__name__.lower():
        raise SkipTest("the select() reactor cannot watch thousands of sockets")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= count:
        return
    if hard != resource.RLIM_INFINITY and hard < count:
        raise SkipTest(f"needs {count} file descriptors, the hard limit is {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))
    except (ValueError, OSError) as exc:
        raise SkipTest(f"cannot raise RLIMIT_NOFILE to {count}: {exc}") from None
    test.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


class AbortWatch:
    """Collects the server's "aborting N sockets" warnings."""

    def __init__(self, test: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        if str(event.get("log_format", "")).startswith("aborting {count} sockets"):
            self.events.append(event)


class ShutdownUnderLoad(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_5000_sockets_all_get_1001(self) -> None:
        need_descriptors(self, 2 * SOCKETS + 200)  # both ends live in this process
        server = start_server(self, max_connections_per_user=0, ping_interval=0, rate_limit=0,
                              shutdown_timeout=20.0)
        aborts = AbortWatch(self)
        clients: list[RawClient] = []
        for start in range(0, SOCKETS, WAVE):
            wave = [RawClient() for _ in range(min(WAVE, SOCKETS - start))]
            yield gatherResults([raw_connect(server.port, client) for client in wave], consumeErrors=True)
            clients.extend(wave)
        self.addCleanup(lambda: gatherResults([c.abort() for c in clients]))
        for index, client in enumerate(clients):
            client.send(SUBSCRIBE % (index % 100))
        yield gatherResults([c.message(0, timeout=30) for c in clients], consumeErrors=True)
        self.assertEqual(server.stats.open_sockets, SOCKETS)
        self.assertEqual(len(server.factory.sockets), SOCKETS)

        started = time.monotonic()
        yield server.stopService()
        elapsed = time.monotonic() - started
        yield gatherResults([c.lost for c in clients])

        codes: dict[int | None, int] = {}
        for client in clients:
            codes[client.close_code] = codes.get(client.close_code, 0) + 1
        self.assertEqual(codes, {1001: SOCKETS})
        self.assertEqual({c.close_reason for c in clients}, {"server shutting down"})
        self.assertEqual(aborts.events, [], "sockets had to be aborted")
        self.assertLess(elapsed, server.settings.shutdown_timeout)
        self.assertEqual(server.factory.sockets, set())
        self.assertEqual(server.stats.open_sockets, 0)
        self.assertEqual(server.stats.sockets_closed["1001"], SOCKETS)


class ShutdownBound(TestCase):
    @inlineCallbacks
    def test_sockets_not_answering_the_close_are_aborted_at_the_bound(self) -> None:
        server = start_server(self, shutdown_timeout=0.5)
        aborts = AbortWatch(self)
        polite = yield raw_connect(server.port, test=self)
        deaf = []
        for _ in range(3):
            deaf.append((yield raw_connect(server.port, answer_close=False, test=self)))
        yield server.stopService()
        self.assertEqual(server.factory.sockets, set())
        self.assertEqual([e["count"] for e in aborts.events], [3])
        yield gatherResults([c.lost for c in [polite, *deaf]])
        self.assertEqual([c.close_code for c in [polite, *deaf]], [1001] * 4)
