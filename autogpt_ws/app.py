"""run_processes: start services under the reactor and return when it stops.

Signals: the first SIGTERM or SIGINT stops the reactor, which stops every
service gracefully (the server closes its sockets with 1001, bounded); a
second one exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import Logger

from .service import StartupError

log = Logger()


class _Signals:
    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.received: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            os.write(2, b"autogpt-ws: second signal, exiting now\n")
            os._exit(128 + signum)
        self.received = signum
        log.info("received {signal}, shutting down", signal=signal.Signals(signum).name)
        self._reactor.callFromThread(self._reactor.stop)


def run_processes(*services: IService, reactor: Any = None) -> int:
    """Run ``services`` in one MultiService until the reactor stops.
    Returns the process exit status: 0 after a clean stop, 1 when a service
    could not start."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    root = MultiService()
    for service in services:
        service.setServiceParent(root)
    try:
        root.privilegedStartService()
    except StartupError as exc:
        sys.stderr.write(f"autogpt-ws: {exc}\n")
        return 1
    status = {"code": 0}
    signals = _Signals(reactor)

    def start() -> None:
        signals.install()
        try:
            root.startService()
        except Exception:
            log.failure("startup failed")
            status["code"] = 1
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()
    return status["code"]
