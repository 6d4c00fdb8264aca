"""Graceful shutdown (PROTOCOL.md section 6): stop accepting, close every
socket with 1001, wait for them within shutdown_timeout, abort the rest."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.helpers import connect, raw_connect, sleep, start_server
from tests.test_web import http_connect


class GracefulStop(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_clients_closed_with_1001(self) -> Any:
        server = start_server(self, shutdown_timeout=5)
        clients = yield gatherResults([connect(server.port, test=self) for _ in range(3)])
        started = time.monotonic()
        stopped = server.stopService()
        closes = yield gatherResults([client.closed for client in clients])
        self.assertEqual(closes, [(1001, "server shutting down")] * 3)
        yield stopped
        # clients that answer the close are not waited on for the whole bound
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual(server.factory.sockets, set())
        self.assertFalse(server.running)
        self.assertFalse(server.bus.running)

    @inlineCallbacks
    def test_client_ignoring_close_is_aborted_after_timeout(self) -> Any:
        server = start_server(self, shutdown_timeout=0.3)
        deaf = yield raw_connect(server.port, test=self, answer_close=False)
        started = time.monotonic()
        stopped = server.stopService()
        yield deaf.lost
        elapsed = time.monotonic() - started
        self.assertEqual(deaf.close_code, 1001)
        # aborted at shutdown_timeout, before Autobahn's own 1 s close timeout
        self.assertGreater(elapsed, 0.25)
        self.assertLess(elapsed, 0.9)
        yield stopped
        self.assertEqual(server.factory.sockets, set())

    @inlineCallbacks
    def test_listener_stops_first(self) -> Any:
        server = start_server(self, shutdown_timeout=0.5)
        port = server.port
        deaf = yield raw_connect(port, test=self, answer_close=False)
        stopped = server.stopService()
        yield sleep(0.05)
        # draining: the old socket is still open, new connections are refused
        self.assertFalse(deaf.lost.called)
        self.assertFalse(stopped.called)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
        yield self.assertFailure(endpoint.connect(Factory.forProtocol(Protocol)), ConnectionRefusedError)
        yield stopped
        self.assertEqual(server.factory.sockets, set())
        yield deaf.lost

    @inlineCallbacks
    def test_stop_called_twice(self) -> Any:
        server = start_server(self, shutdown_timeout=0.3)
        yield raw_connect(server.port, test=self, answer_close=False)
        first = server.stopService()
        second = server.stopService()
        yield gatherResults([first, second])
        self.assertFalse(server.running)
        yield server.stopService()  # after the stop: at once

    @inlineCallbacks
    def test_stop_with_no_sockets_is_immediate(self) -> Any:
        server = start_server(self, shutdown_timeout=10)
        conn = yield http_connect(server.port, test=self)
        yield conn.request("GET", "/health")
        started = time.monotonic()
        yield server.stopService()
        # an idle HTTP keep-alive connection does not hold the stop
        self.assertLess(time.monotonic() - started, 0.5)
