"""WebsocketServer: one Twisted service owning the listener, the event bus,
the hub and the Autobahn factory, with a bounded graceful stop."""

from __future__ import annotations

import os
from typing import Any

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import __version__
from ..bus import IEventBus
from ..config import Settings
from ..core.catchup import LatestEvents
from ..core.channels import Layout
from ..core.hub import HISTORY_SWEEP, Hub
from ..core.router import Router
from ..sockets.auth import TokenVerifier, verifier_for
from ..sockets.factory import WebsocketFactory
from ..stats import Stats
from ..web.metrics import Metrics
from ..web.routes import QuietSite, Root, Upgrade

log = Logger()


def make_bus(settings: Settings, router: Router, reactor: Any, stats: Stats, hub: Hub,
             kind: str | None = None) -> IEventBus:
    """The bus ``settings.event_bus`` (or ``kind``) names; ``auto`` finds
    out which of the Redis buses to run, and builds it with this."""
    kind = kind or settings.event_bus
    if kind == "redis":
        from ..bus.redis import RedisBus

        return RedisBus(settings, router, reactor, stats)
    if kind == "redis-cluster":
        from ..bus.cluster import ClusterBus

        return ClusterBus(settings, router, reactor, stats, hub)
    if kind == "auto":
        from ..bus.detect import AutoBus

        return AutoBus(settings, reactor, lambda found: make_bus(settings, router, reactor, stats, hub, found))
    from ..bus.memory import MemoryBus

    return MemoryBus(router)


def format_listen_address(address: Any) -> str:
    """A listening address for logs: ``host:port``, ``[v6]:port``, or the
    path of a UNIX socket."""
    if isinstance(address, UNIXAddress):
        name = address.name
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    host, port = getattr(address, "host", ""), getattr(address, "port", "")
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class StartupError(Exception):
    """The server cannot start; ``str()`` is the one line to show."""


class WebsocketServer(MultiService):
    """The whole server. Its children are the event bus and the listener;
    ``port`` is the bound port once running (useful with port 0)."""

    name = "autogpt-ws"

    def __init__(self, settings: Settings, reactor: Any = None,
                 verifier: TokenVerifier | None = None, bus: IEventBus | None = None,
                 worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker  # the index under --workers, for the logs
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.settings = settings
        self.reactor = reactor
        self.stats = Stats()
        keyed_history = settings.permessage_deflate and settings.deflate_history > 0
        self.hub = Hub(keyed_history)
        self.layout = Layout(settings.execution_event_bus_name, settings.notification_event_bus_name)
        # catch-up keeps what the bus brings: on the sharded bus, only the
        # events of channels subscribed here (so it records none there yet)
        self.catchup = LatestEvents(settings, reactor, self.stats) if settings.catchup_enabled else None
        self.metrics = Metrics(self.stats, lambda: self.hub.frames_out, self._bus_up,
                               (lambda: self.catchup.bytes if self.catchup else 0), self.hub.history_bytes)
        self.router = Router(self.hub, self.stats, self.layout, self.metrics.fanout_latency.observe,
                             graph_events=self.catchup, max_size=settings.max_message_size_limit)
        self.verifier = verifier or verifier_for(settings, reactor)
        self.bus = bus or make_bus(settings, self.router, reactor, self.stats, self.hub)
        self.bus.setServiceParent(self)
        self.factory = WebsocketFactory(settings, self.hub, self.stats, self.verifier, reactor,
                                        catchup=self.catchup, gate=lambda: getattr(self.bus, "gate", None))
        root = Root(Upgrade(self.factory), self.ready,
                    self.metrics.render if settings.enable_metrics else None, settings.cors_allow_origins)
        self.site = QuietSite(root, settings, self.stats, websocket=self.factory,
                              timeout=settings.open_handshake_timeout or None, reactor=reactor)
        self.site.noisy = False
        self.factory.noisy = False
        self.listener: StreamServerEndpointService = strports.service(settings.endpoint, self.site, reactor=reactor)
        self.listener._raiseSynchronously = True
        self.listener.setServiceParent(self)
        if keyed_history:  # forget the idle keys' history
            sweeper = TimerService(HISTORY_SWEEP, self.hub.sweep)
            sweeper.clock = reactor
            sweeper.setServiceParent(self)
        self.stopping = False
        self._stop_waiters: list[Deferred[None]] = []
        self._stop_done = False

    # -- state --------------------------------------------------------------

    def _bus_up(self) -> bool:
        return self.bus.ready()[0]

    def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        if not self.running:
            return False, "starting"
        return self.bus.ready()

    @property
    def port(self) -> int:
        listening = getattr(self.listener, "_waitingForPort", None)
        if listening is None or not listening.called:
            raise RuntimeError("not listening")
        return int(listening.result.getHost().port)

    # -- lifecycle ----------------------------------------------------------

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as exc:
            raise StartupError(f"cannot listen on {self.settings.endpoint}: {exc.socketError}") from None
        except Exception as exc:  # bad TLS material and the like
            raise StartupError(f"cannot listen on {self.settings.endpoint}: {type(exc).__name__}: {exc}") from None

    def startService(self) -> None:
        self.factory.startFactory()
        self.verifier.start()
        super().startService()
        log.info(
            "autogpt-ws {version}{which} listening on {address} (pid {pid}), event bus {bus}, auth {auth}",
            version=__version__, which=f" worker {self.worker}" if self.worker is not None else "",
            address=self._address(), pid=os.getpid(), bus=self.bus.describe(), auth=self.settings.auth_mode,
            worker=self.worker,
        )

    def _address(self) -> str:
        """Where it listens: host:port ([v6]:port), or a socket's path."""
        listening = getattr(self.listener, "_waitingForPort", None)
        if listening is None or not listening.called or not hasattr(listening.result, "getHost"):
            return self.settings.endpoint
        return format_listen_address(listening.result.getHost())

    def stopService(self) -> Deferred[None]:
        """Stop accepting, close every socket with 1001 and wait for them
        (bounded by shutdown_timeout, then abort the rest), then stop the
        other children (the event bus...) in reverse order.  Calling it again
        while it runs waits for the same stop."""
        if self._stop_done:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._stop_waiters.append(done)
        if not self.stopping:
            self.stopping = True
            self._stop().addBoth(self._stopped)
        return done

    def _stopped(self, result: object) -> None:
        if isinstance(result, Failure):
            log.failure("graceful stop failed", result)
        self._stop_done = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    @inlineCallbacks
    def _stop(self) -> Any:
        started = self.reactor.seconds()
        if self.listener.running or getattr(self.listener, "_waitingForPort", None) is not None:
            # bound (privilegedStartService) even if never started
            yield maybeDeferred(self.listener.stopService)
        yield self.factory.close_all(self.settings.shutdown_timeout)
        self.factory.flusher.flush_all()  # no write left queued, no call left pending
        hand_over = getattr(self.bus, "hand_over", None)  # the cluster bus: a rolling restart loses nothing
        if hand_over is not None and self.settings.catchup_handover > 0:
            left = self.settings.shutdown_timeout - (self.reactor.seconds() - started)
            yield maybeDeferred(hand_over, min(self.settings.catchup_handover, max(0.0, left)))
        for child in reversed(list(self)):
            if child is not self.listener and child.running:
                try:
                    yield maybeDeferred(child.stopService)
                except Exception:
                    log.failure("stopping {service} failed", service=child.name or repr(child))
        self.factory.stopFactory()
        Service.stopService(self)
        log.info("autogpt-ws stopped in {elapsed:.2f}s", elapsed=self.reactor.seconds() - started)
