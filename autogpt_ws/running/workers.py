"""Several server processes on one port: ``--workers N``.

The parent is a small supervisor: it binds nothing that serves, spawns N
children (``python -m autogpt_ws.running.worker <same options>``), each a complete
server with its own reactor, its own event-bus subscription and its own
listening socket bound with ``SO_REUSEPORT``, so the kernel spreads new
connections across them.  The supervisor

* restarts a worker that dies, after a backoff (0.5 s doubling to 30 s; a
  worker that ran for 30 s or more starts the backoff again), so a crash
  loop never spins;
* gives up (and exits 1) when a worker fails in its first seconds with the
  startup or configuration exit status (1 or 2): a port in use or a bad
  setting will not get better by retrying;
* on SIGTERM or SIGINT sends SIGTERM to every worker (each closes its
  sockets with 1001, bounded by ``shutdown_timeout``), waits for them all,
  kills any still alive after ``shutdown_timeout + 5`` s, and exits 0.

Children are put in their own process group (so a Ctrl-C on the terminal
reaches the supervisor only, which forwards one SIGTERM) and ask the kernel
for SIGTERM should the supervisor die.

This module also holds the ``SO_REUSEPORT`` listener every worker uses
(:func:`listener_service`); Twisted's TCP port never sets that option.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from typing import Any, Sequence

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import Settings

log = Logger()

# environment handed to workers
ENV_INDEX = "AUTOGPT_WS_WORKER_INDEX"
ENV_PORT = "AUTOGPT_WS_WORKER_PORT"
ENV_SUPERVISOR = "AUTOGPT_WS_SUPERVISOR_PID"

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a worker up this long resets its backoff
EARLY_FAILURE = 5.0  # a first start failing this fast with status 1/2 is fatal
DEFAULT_BACKLOG = 1024


# -- the SO_REUSEPORT listener ---------------------------------------------------


class ReusePortTCPPort(tcp.Port):
    """A TCP listening port bound with SO_REUSEPORT (and, as Twisted does
    on POSIX, SO_REUSEADDR)."""

    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """Like ``TCP4ServerEndpoint``/``TCP6ServerEndpoint`` (the interface
    decides the family), with SO_REUSEPORT.  ``tls`` is an optional
    ``IOpenSSLContextFactory``-like object: the factory is then wrapped in
    TLS, as an ``ssl:`` endpoint does."""

    def __init__(self, reactor: Any, port: int, backlog: int = DEFAULT_BACKLOG,
                 interface: str = "", tls: Any = None) -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface
        self._tls = tls

    def listen(self, protocolFactory: Factory) -> defer.Deferred[Any]:
        return defer.execute(self._listen, protocolFactory)

    def _listen(self, factory: Factory) -> tcp.Port:
        if self._tls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(self._tls, False, factory)
        port = ReusePortTCPPort(self._port, factory, self._backlog, self._interface, self._reactor)
        port.startListening()
        return port


def reuse_port_endpoint(description: str, reactor: Any, port: int | None = None) -> ReusePortEndpoint:
    """The SO_REUSEPORT twin of a ``tcp:``/``tcp6:``/``ssl:`` endpoint
    string (``port`` replaces the string's port when given).  Other
    endpoint types cannot share a port this way: ValueError."""
    from twisted.internet.endpoints import serverFromString

    endpoint = serverFromString(reactor, description)
    tls = getattr(endpoint, "_sslContextFactory", None)
    if not hasattr(endpoint, "_port") or not hasattr(endpoint, "_interface"):
        raise ValueError(f"{description!r}: only tcp, tcp6 and ssl endpoints can be shared by workers")
    # Twisted's default listen(2) backlog is 50: a reconnect storm (every
    # client of a restarted server back within a second) overflows it and
    # the kernel drops SYNs, which clients retry only after 1 s, then 3 s.
    # Workers exist for load: unless the string names one, use 1024.
    backlog = int(getattr(endpoint, "_backlog", DEFAULT_BACKLOG)) if "backlog=" in description else DEFAULT_BACKLOG
    return ReusePortEndpoint(reactor, endpoint._port if port is None else port,
                             backlog, endpoint._interface, tls)


def listener_service(settings: Settings, site: Any, reactor: Any, reuse_port: bool = False,
                     port: int | None = None) -> StreamServerEndpointService:
    """The listening service of one server: ``strports.service`` as today,
    or, with ``reuse_port``, the same endpoint bound with SO_REUSEPORT.
    Either way a bind failure raises at ``privilegedStartService``."""
    if reuse_port:
        service = StreamServerEndpointService(reuse_port_endpoint(settings.endpoint, reactor, port), site)
        service.reuse_port = True  # type: ignore[attr-defined]
    else:
        service = strports.service(settings.endpoint, site, reactor=reactor)
    service._raiseSynchronously = True
    return service


def use_reuse_port(server: Any, port: int | None = None) -> None:
    """Give a built (not yet started) ``WebsocketServer`` a SO_REUSEPORT
    listener in place of the one it made."""
    old = server.listener
    if getattr(old, "reuse_port", False) and port is None:
        return
    server.removeService(old)
    new = listener_service(server.settings, server.site, server.reactor, reuse_port=True, port=port)
    new.setServiceParent(server)
    server.listener = new


# -- the supervisor ----------------------------------------------------------------


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The parent's options minus ``--workers``/``-w`` (a worker is one
    process; it also forces workers=1 itself)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "-w"):
            skip = True
            continue
        if arg.startswith("--workers=") or (arg.startswith("-w") and not arg.startswith("--") and len(arg) > 2):
            continue
        out.append(arg)
    return out


class _Child(ProcessProtocol):
    def __init__(self, supervisor: "Supervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.started = time.monotonic()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        self.supervisor.ended(self, code, sig)


class Supervisor:
    def __init__(self, settings: Settings, argv: Sequence[str], reactor: Any,
                 python: str = sys.executable) -> None:
        self.settings = settings
        self.count = settings.workers
        self.argv = worker_argv(argv)
        self.reactor = reactor
        self.python = python
        self.children: dict[int, _Child] = {}
        self.backoff: dict[int, float] = {}
        self.timers: dict[int, Any] = {}
        self.launched: set[int] = set()
        self.stopping = False
        self.status = 0
        self.port: int | None = None
        self._holder: socket.socket | None = None
        self._kill_timer: Any = None
        self.restarts: dict[int, int] = {}

    # -- port 0: pick one port for every worker -------------------------------

    def reserve_port(self) -> None:
        """With port 0 every worker would get its own port: bind one here
        (SO_REUSEPORT, never listening, so it takes no connection) and give
        that port to every worker."""
        s = self.settings
        if s.listen or s.port != 0:
            return
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        holder = socket.socket(family, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((s.host, 0))
        self._holder = holder
        self.port = holder.getsockname()[1]

    # -- workers ------------------------------------------------------------

    def start(self) -> None:
        log.info("supervisor {pid}: starting {count} workers", pid=os.getpid(), count=self.count)
        for index in range(self.count):
            self.spawn(index)

    def spawn(self, index: int) -> None:
        self.timers.pop(index, None)
        if self.stopping:
            return
        env = dict(os.environ)
        env[ENV_INDEX] = str(index)
        env[ENV_SUPERVISOR] = str(os.getpid())
        if self.port is not None:
            env[ENV_PORT] = str(self.port)
        child = _Child(self, index)
        args = [self.python, "-m", "autogpt_ws.running.worker", *self.argv]
        self.reactor.spawnProcess(child, self.python, args, env=env, childFDs={0: "w", 1: 1, 2: 2})
        self.children[index] = child
        self.launched.add(index)
        log.info("worker {index} started (pid {pid})", index=index, pid=child.pid)

    def ended(self, child: _Child, code: int | None, sig: int | None) -> None:
        if self.children.get(child.index) is child:
            del self.children[child.index]
        how = f"signal {sig}" if sig else f"status {code}"
        if self.stopping:
            log.info("worker {index} (pid {pid}) stopped ({how})", index=child.index, pid=child.pid, how=how)
            if not self.children:
                self._all_stopped()
            return
        lived = time.monotonic() - child.started
        if not self.restarts.get(child.index) and code in (1, 2) and lived < EARLY_FAILURE:
            log.error("worker {index} failed at startup ({how}); stopping", index=child.index, how=how)
            self.status = code
            self.stop()
            return
        delay = BACKOFF_START if lived >= STABLE_AFTER else self.backoff.get(child.index, BACKOFF_START / 2) * 2
        delay = min(delay, BACKOFF_MAX)
        self.backoff[child.index] = delay
        self.restarts[child.index] = self.restarts.get(child.index, 0) + 1
        log.warn("worker {index} (pid {pid}) exited ({how}); restarting in {delay:.1f}s",
                 index=child.index, pid=child.pid, how=how, delay=delay)
        self.timers[child.index] = self.reactor.callLater(delay, self.spawn, child.index)

    # -- stopping -------------------------------------------------------------

    def signal(self, signum: int) -> None:
        if self.stopping:
            log.warn("second {signal}: killing workers", signal=signal.Signals(signum).name)
            self._kill_all()
            return
        log.info("supervisor received {signal}, stopping workers", signal=signal.Signals(signum).name)
        self.stop()

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for timer in self.timers.values():
            if timer.active():
                timer.cancel()
        self.timers.clear()
        if not self.children:
            self._all_stopped()
            return
        for child in self.children.values():
            self._send(child, signal.SIGTERM)
        grace = self.settings.shutdown_timeout + 5.0
        self._kill_timer = self.reactor.callLater(grace, self._kill_all)

    def _send(self, child: _Child, signum: int) -> None:
        try:
            child.transport.signalProcess(signum)  # type: ignore[union-attr]
        except Exception:  # already gone
            pass

    def _kill_all(self) -> None:
        for child in self.children.values():
            log.warn("worker {index} (pid {pid}) did not stop in time: killing", index=child.index, pid=child.pid)
            self._send(child, signal.SIGKILL)

    def _all_stopped(self) -> None:
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        if self._holder is not None:
            self._holder.close()
            self._holder = None
        log.info("all workers stopped")
        if self.reactor.running:
            self.reactor.stop()


def run_workers(settings: Settings, argv: Sequence[str], reactor: Any = None) -> int:
    """Run ``settings.workers`` server processes sharing the port until
    SIGTERM/SIGINT; 0 after a clean stop, 1 (or 2) when workers cannot
    start."""
    if settings.event_bus == "memory":
        sys.stderr.write("autogpt-ws: workers > 1 need a shared event bus (event_bus redis or "
                         "redis-cluster): the embedded memory bus lives in one process\n")
        return 2
    kind = (settings.listen or "tcp").partition(":")[0]
    if kind not in ("tcp", "tcp6", "ssl"):
        sys.stderr.write(f"autogpt-ws: workers > 1 need a tcp, tcp6 or ssl listener, not {kind!r}\n")
        return 2
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    supervisor = Supervisor(settings, argv, reactor)
    try:
        supervisor.reserve_port()
    except OSError as exc:
        sys.stderr.write(f"autogpt-ws: cannot reserve a port on {settings.host}: {exc.strerror}\n")
        return 1

    def on_signal(signum: int, frame: Any) -> None:
        reactor.callFromThread(supervisor.signal, signum)

    def start() -> None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        supervisor.start()

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=True)
    return supervisor.status


# -- the worker side (used by autogpt_ws.running.worker) ------------------------------------


def detach_from_terminal_group() -> None:
    """A supervised worker: own process group (the terminal's Ctrl-C goes
    to the supervisor, which forwards one SIGTERM), and SIGTERM when the
    supervisor dies (Linux)."""
    try:
        os.setpgid(0, 0)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            raise
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    parent = os.environ.get(ENV_SUPERVISOR)
    if parent and parent.isdigit() and os.getppid() != int(parent):
        # the supervisor died before PDEATHSIG was set
        os.kill(os.getpid(), signal.SIGTERM)
