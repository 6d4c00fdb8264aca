"""deploy/healthcheck.py, the image's HEALTHCHECK, run as the image runs it:
a process with the server's environment, against a real listener."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.helpers import free_port, make_settings, start_server
from tests.test_fastpath import self_signed
from tests.test_runners import ROOT, clean_env

SCRIPT = os.path.join(ROOT, "deploy", "healthcheck.py")


def healthcheck(**env: str) -> Any:
    """Fires with (output, exit status)."""
    d = getProcessOutputAndValue(sys.executable, [SCRIPT], env=clean_env(**env), path=ROOT, reactor=reactor)
    return d.addCallback(lambda result: (result[0].decode().strip(), result[2]))


class HealthCheck(TestCase):
    @inlineCallbacks
    def test_healthy_on_the_configured_port(self) -> None:
        server = start_server(self)
        output, status = yield healthcheck(WEBSOCKET_SERVER_HOST="127.0.0.1", WEBSOCKET_SERVER_PORT=str(server.port))
        self.assertEqual((output, status), ("", 0))

    @inlineCallbacks
    def test_an_empty_host_is_checked_on_loopback(self) -> None:
        # WEBSOCKET_SERVER_HOST="" listens on every interface
        server = start_server(self)
        output, status = yield healthcheck(WEBSOCKET_SERVER_HOST="", WEBSOCKET_SERVER_PORT=str(server.port))
        self.assertEqual((output, status), ("", 0))

    @inlineCallbacks
    def test_unhealthy_when_nothing_listens(self) -> None:
        output, status = yield healthcheck(WEBSOCKET_SERVER_HOST="127.0.0.1", WEBSOCKET_SERVER_PORT=str(free_port()))
        self.assertEqual(status, 1)
        self.assertIn("unhealthy:", output)
        self.assertIn("Connection refused", output)

    @inlineCallbacks
    def test_unhealthy_when_health_is_not_200(self) -> None:
        # a listener answering /health with something else than 200
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        output, status = yield healthcheck(WEBSOCKET_SERVER_HOST="127.0.0.1",
                                           WEBSOCKET_SERVER_PORT=str(port.getHost().port))
        self.assertEqual((output, status), ("unhealthy: /health answered 404", 1))

    @inlineCallbacks
    def test_unhealthy_on_a_bad_setting(self) -> None:
        output, status = yield healthcheck(WEBSOCKET_SERVER_PORT="eighty")
        self.assertEqual(status, 1)
        self.assertIn("unhealthy: configuration error: port", output)

    @inlineCallbacks
    def test_follows_a_unix_listener(self) -> None:
        directory = tempfile.mkdtemp(prefix="autogpt-ws-")  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "ws.sock")
        start_server(self, make_settings(listen=f"unix:{path}"))
        output, status = yield healthcheck(AUTOGPT_WS_LISTEN=f"unix:{path}")
        self.assertEqual((output, status), ("", 0))

    @inlineCallbacks
    def test_follows_a_tls_listener(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        key, cert = self_signed(directory)
        port = free_port()
        listen = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        start_server(self, make_settings(listen=listen))
        output, status = yield healthcheck(AUTOGPT_WS_LISTEN=listen)
        self.assertEqual((output, status), ("", 0))
