"""run_processes: start services under the reactor and return when it stops.

Signals: the first SIGTERM or SIGINT stops the reactor, which stops every
service gracefully (the server closes its sockets with 1001, bounded); a
second one exits at once with status 128 + signal number.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from types import FrameType
from typing import IO, Any

from twisted.application.service import IService, MultiService, Service
from twisted.logger import Logger

from .service import StartupError

log = Logger()


class Signals:
    """SIGTERM/SIGINT handling of a foreground run.

    The handler itself only schedules work on the reactor (logging from a
    signal handler could interleave with a line being written); a second
    signal while the first is being handled exits the process at once."""

    def __init__(self, reactor: Any, exit: Any = os._exit) -> None:
        self._reactor = reactor
        self._exit = exit
        self.received: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        if self.received is not None:
            os.write(2, b"autogpt-ws: second signal, exiting now\n")
            self._exit(128 + signum)
            return
        self.received = signum
        self._reactor.callFromThread(self._stop, signum)

    def _stop(self, signum: int) -> None:
        log.info("received {signal}, shutting down", signal=signal.Signals(signum).name)
        if self._reactor.running:
            self._reactor.stop()


def freeze_heap() -> None:
    """Take what the process built to start (modules, classes, settings, the
    service tree: about 60,000 objects) out of the garbage collector's
    sight.  A full collection then walks the sockets' objects only, not
    everything that lives forever anyway: connection setup costs 5-10% less
    CPU (docs/performance.md).  Call once, when startup is done."""
    gc.collect()
    gc.freeze()


class HeapFreezer(Service):
    """Added last to a service tree: once every other service has started,
    it calls freeze_heap()."""

    def startService(self) -> None:
        super().startService()
        freeze_heap()


def run_processes(*services: IService, reactor: Any = None, stderr: IO[str] | None = None) -> int:
    """Run ``services`` in one MultiService until the reactor stops.

    Returns the process exit status: 0 after a clean stop (signal or not),
    1 when a service could not start (a port in use: one line on stderr)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    err = stderr or sys.stderr
    root = MultiService()
    for service in services:
        service.setServiceParent(root)
    HeapFreezer().setServiceParent(root)
    try:
        root.privilegedStartService()
    except StartupError as exc:
        err.write(f"autogpt-ws: {exc}\n")
        err.flush()
        return 1
    status = {"code": 0}
    signals = Signals(reactor)

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
