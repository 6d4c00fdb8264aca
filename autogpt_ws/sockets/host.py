"""What a socket asks of the factory that made it: a seam, so that the
protocol (and its outbound half) and the factory do not import each other.
:class:`~autogpt_ws.sockets.factory.WebsocketFactory` is the one host."""

from __future__ import annotations

from typing import Any, Protocol

from autobahn.websocket.types import ConnectionDeny, ConnectionRequest

from ..config import Settings
from ..core.hub import Hub
from ..core.session import Session
from ..stats import Stats
from .auth import TokenVerifier
from .deflate import Deflaters
from .flush import Flusher
from .keepalive import Keepalive


class Gatekeeper(Protocol):
    def refuse(self, request: ConnectionRequest) -> ConnectionDeny | None:
        """Why an upgrade is refused before authentication, or None."""


class SocketHost(Protocol):
    settings: Settings
    hub: Hub
    stats: Stats
    verifier: TokenVerifier
    clock: Any
    flusher: Flusher
    keepalive: Keepalive
    deflaters: Deflaters
    admission: Gatekeeper
    sockets: set[Any]
    transport_buffer: int

    def session_for(self, proto: Any) -> Session:
        """The session (inbound logic) of a socket that just opened."""

    def socket_closed(self, proto: Any) -> None:
        """A socket is gone (the factory may be waiting for the last one)."""
